"""Fine-tuning as users run it: assistant-only labels on real chats, JSONL checks that name the line,
seeded resumable batches, Orbax training-state checkpoints that resume exactly, and `qvl-jax
finetune` end to end on tiny-random (an adapter that qvl_jax.load applies; --resume), plus the
training benchmark's quick mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import qvl_jax
from qvl_jax import cli
from qvl_jax.errors import InputError
from qvl_jax.training import LoraConfig, Trainer
from qvl_jax.training.data import Batches, chat_labels, encode_record, read_jsonl
from qvl_jax.training.state import TrainCheckpoints

ROOT = Path(__file__).resolve().parents[1]
HOUSE = ROOT / "examples" / "house.png"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One QVL_JAX_CACHE (tiny-random built there once) for the whole module."""
    path = tmp_path_factory.mktemp("ft_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_JAX_CACHE", str(path))
        mp.setenv("QVL_JAX_COMPILATION_CACHE", "0")
        yield path


@pytest.fixture(scope="module")
def proc(cache):
    return qvl_jax.Processor.from_pretrained("tiny-random")


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image", "image": str(HOUSE)}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A house."},
    {"role": "user", "content": "And the roof?"},
    {"role": "assistant", "content": [{"type": "text", "text": "\n\nRed roof."}]},
]


def _spans(labels_row: np.ndarray) -> list[tuple[int, int]]:
    on = np.concatenate([[False], labels_row != -100, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])
    return list(zip(edges[::2], edges[1::2]))


def test_labels_are_exactly_the_assistant_turns(proc):
    inp = proc.apply_chat_template(CHAT, tokenize=True, return_dict=True)
    ids = inp["input_ids"]
    labels = chat_labels(ids, proc, inp["attention_mask"])
    kept = labels != -100
    assert (labels[kept] == ids[kept]).all()
    # Each trained span decodes to one assistant message's text and its <|im_end|>: nothing of the
    # header, the system or user turns, or the newline after <|im_end|>.
    texts = [proc.decode(ids[0, a:b], skip_special_tokens=False) for a, b in _spans(labels[0])]
    assert texts == ["A house.<|im_end|>", "\n\nRed roof.<|im_end|>"]
    prompt = proc.apply_chat_template(CHAT)
    assert prompt.count("<|im_start|>assistant\n") == 2
    # in a padded batch (either side) each row keeps its own labels, and nothing at or after padding
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    for side in ("left", "right"):
        batch = proc.apply_chat_template([CHAT, short], tokenize=True, return_dict=True, padding_side=side)
        got = chat_labels(batch["input_ids"], proc, batch["attention_mask"])
        mask = batch["attention_mask"]
        assert (got[mask == 0] == -100).all() and (got[:, 1:][mask[:, :-1] == 0] == -100).all()
        for r, conv in enumerate([CHAT, short]):
            alone = proc.apply_chat_template(conv, tokenize=True, return_dict=True)
            row = got[r][mask[r] > 0]
            assert (row == chat_labels(alone["input_ids"], proc)[0]).all(), side


def test_labels_on_a_prompt_with_no_assistant_turn_are_all_ignored(proc):
    ids = proc.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    # the generation prompt's header opens a turn with no content yet: nothing to train
    assert (chat_labels(ids, proc) == -100).all()


# ----------------------------------------------------------------------------------------------------
# JSONL


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def _records(tmp_path: Path, n: int = 3, image: bool = True) -> Path:
    shutil.copy(HOUSE, tmp_path / "house.png")
    picture = [{"type": "image", "image": "house.png"}] if image else []
    rows = [{"messages": [{"role": "user", "content": [*picture, {"type": "text", "text": "What is this?"}]},
                          {"role": "assistant", "content": "A house with a red roof."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    return _write(tmp_path / "train.jsonl", (rows * n)[:n])


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected an object"),
    ({"conversation": []}, "no 'messages' key"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "x"}]}, "unknown content type 'audio'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                   {"role": "assistant", "content": "x"}]}, "image file not found"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "'content' must be"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "image", "image": "house.png"}]}]}, "assistant messages hold text only"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "nope"}]},
                   {"role": "assistant", "content": "x"}]}, "no video file or frame directory"),
]


@pytest.mark.parametrize("bad,match", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_records_name_file_and_line(tmp_path, bad, match):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", bad, GOOD])  # line 2 is blank: the bad one is line 3
    with pytest.raises(InputError, match=match) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}, line 3") and "\n" not in str(e.value)


def test_unreadable_image_fails_at_batch_time_with_its_line(tmp_path, proc):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write(tmp_path / "d.jsonl", [GOOD, {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "broken.png"}]}, {"role": "assistant", "content": "x"}]}])
    records = read_jsonl(path)
    with pytest.raises(InputError, match=r"d\.jsonl, line 2: cannot read image file") as e:
        encode_record(records[1], proc)
    assert "\n" not in str(e.value)


def test_batches_are_seeded_cover_each_epoch_and_resume_from_a_position(tmp_path, proc):
    records = read_jsonl(_records(tmp_path, 5))
    a = Batches(records, proc, batch_size=2, seed=1)

    def walk(b, n):  # the record indices of the next n batches from position 0
        out, p = [], 0
        for _ in range(n):
            out.append(b.indices(p))
            p += len(out[-1])
        return out

    order = walk(a, 9)
    # an epoch is ceil(5 / 2) = 3 batches, its last holding the remainder: each epoch is a
    # permutation of all records, and no batch runs on into the next epoch
    assert a.steps_per_epoch == 3 and [len(x) for x in order] == [2, 2, 1] * 3
    for e in range(3):
        assert sorted(sum(order[3 * e: 3 * e + 3], [])) == list(range(5))
    assert len({tuple(sum(order[3 * e: 3 * e + 3], [])) for e in range(3)}) > 1  # a fresh order each epoch
    assert order == walk(Batches(records, proc, 2, seed=1), 9)
    assert order != walk(Batches(records, proc, 2, seed=2), 9)
    a.next()
    a.next()
    b = Batches(records, proc, 2, seed=1, position=a.position)
    x, y = a.next(), b.next()
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
    assert x["labels"].shape == x["input_ids"].shape and (x["labels"] != -100).any()


# ----------------------------------------------------------------------------------------------------
# Orbax training state: stopping and resuming changes nothing


def _trainer(lora: bool):
    model = qvl_jax.load("tiny-random")
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, 4, 0.0), weight_decay=0.01)
    return Trainer(model, tx, lora=LoraConfig(r=4, alpha=8) if lora else None, max_grad_norm=1.0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_gives_the_same_losses(tmp_path, proc, cache, lora):
    # Batches of all three records (in a new order each epoch) share one shape: one compile. Full
    # fine-tuning runs on text alone, which spares compiling the vision tower's gradients twice over.
    records = read_jsonl(_records(tmp_path, 3, image=lora))
    straight, batches = _trainer(lora), Batches(records, proc, 3)
    want = [straight.step(batches.next()) for _ in range(4)]
    first, batches = _trainer(lora), Batches(records, proc, 3)
    got = [first.step(batches.next()) for _ in range(2)]
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        ckpt.save(first, batches.position, {"note": "x"})
    second = _trainer(lora)
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        meta = ckpt.restore(second)
    assert meta["step"] == 2 and meta["note"] == "x" and second.steps == 2
    batches = Batches(records, proc, 3, position=meta["data_position"])
    got += [second.step(batches.next()) for _ in range(2)]
    assert np.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    assert len(set(want)) == 3  # the steps did move the weights (but the first, at warm-up's lr 0)


def test_restore_refuses_another_trainable_set(tmp_path, cache):
    from qvl_jax.errors import CheckpointError

    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        ckpt.save(_trainer(True), 0)
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:  # as a new process opens it
        other = Trainer(qvl_jax.load("tiny-random"), optax.adamw(1e-3), lora=LoraConfig(r=4, target_modules=["q_proj"]))
        with pytest.raises(CheckpointError, match="does not match this trainer") as e:
            ckpt.restore(other)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# the CLI


# The LoRA configuration and batch shape of the library tests above: their compiled steps are reused.
LORA = ("--lora-rank", 4, "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--batch-size", 3)


def _finetune(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["finetune", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_finetune_cli_writes_an_adapter_that_load_applies(tmp_path, cache, capsys):
    data = _records(tmp_path, 3)
    out = tmp_path / "out"
    rc, stdout, err = _finetune(capsys, "--model", "tiny-random", "--data", data, "--eval", data, "--out", out,
                                "--steps", 2, *LORA, "--lr", 1e-2, "--save-every", 1)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["adapter"] == str(out / "adapter") and summary["eval_loss"] > 0
    assert "loss=" in err and "tok_s=" in err and "lr=" in err and "eval loss" in err  # the progress bar
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    base = qvl_jax.load("tiny-random")
    tuned = qvl_jax.load("tiny-random", adapter=out / "adapter")
    ids = np.array([[1, 2, 3, 4, 5]])
    assert not np.allclose(base.logits(ids), tuned.logits(ids), atol=1e-6)  # trained B is non-zero
    # an earlier run's checkpoints are never overwritten silently
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, "--steps", 2)
    assert rc == 2 and err.startswith("error: ") and "--resume" in err and len(err.strip().splitlines()) == 1


def test_finetune_resume_finishes_as_the_uninterrupted_run(tmp_path, cache, capsys):
    from safetensors.numpy import load_file

    data = _records(tmp_path, 3)
    args = ("--data", data, "--steps", 4, *LORA, "--lr", 1e-2, "--save-every", 2)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _finetune(capsys, *args, "--out", a)[0] == 0
    # b: the same run stopped after step 2 (its step-4 checkpoint and adapter never written)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "4")
    shutil.rmtree(b / "adapter")
    rc, _, err = _finetune(capsys, *args, "--out", b, "--seed", 1, "--resume")
    assert rc == 2 and "--seed 0, this one 1" in err
    rc, stdout, err = _finetune(capsys, *args, "--out", b, "--resume")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 4
    want, got = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_finetune_bad_data_is_one_line_with_the_line_number_and_leaves_nothing(tmp_path, cache, capsys):
    data = _write(tmp_path / "train.jsonl", [GOOD, GOOD, {"messages": [{"role": "user", "content": "Hi"}]}])
    out = tmp_path / "out"
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, "--steps", 1)
    assert rc == 2 and err == f"error: {data}, line 3: no assistant message: nothing to learn from this record\n"
    assert not out.exists()
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, "--steps", 0)
    assert rc == 2 and "--steps must be positive" in err


def test_finetune_help_is_fast_and_shows_defaults():
    code = ("import sys\nfrom qvl_jax import cli\n"
            "try:\n    cli.main(['finetune', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('jax', 'numpy', 'optax', 'orbax', 'flax') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    text = " ".join(run.stdout.split())
    for default in ("(default: 16)", "(default: 1.0)", "(default: 4)", "(default: 100)", "(default: 2 x rank)"):
        assert default in text, default


# ----------------------------------------------------------------------------------------------------


def test_bench_train_quick_runs(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick"], capture_output=True,
                         text=True, cwd=ROOT, check=False, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {line["impl"] for line in lines} >= {"qvl_jax", "transformers+peft"}
    summary = lines[-1]
    assert summary["tokens_per_s_ratio"] > 0 and summary["impl"] == "ratio"
