"""The first ten minutes: the README's set-up and Python program as written, docs that point at real
files, and the CLI's manners (fast --help, defaults shown, --debug anywhere, fresh sampling seeds,
escaped control characters, Ctrl-C, permission problems, undecodable arguments, model resolution)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl_jax import cli, hub
from qvl_jax.errors import CheckpointError
from qvl_jax.processing.processor import Processor
from qvl_jax.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _env(cache: Path) -> dict:
    return dict(os.environ, QVL_JAX_CACHE=str(cache), QVL_JAX_COMPILATION_CACHE="0")


def _one_error_line(stderr: str) -> str:
    """The single line that is not a progress notice."""
    lines = [line for line in stderr.strip().splitlines()
             if not line.startswith(("***", "building", "converting", "downloading"))]
    assert len(lines) == 1, stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# README and docs


def test_readme_python_runs_as_written(tmp_path):
    """Every python block of the README, in order, as one program: tiny-random through
    qvl_jax.load / Processor.from_pretrained, with nothing cached yet."""
    code = "\n".join(_blocks((ROOT / "README.md").read_text(), "python"))
    assert "qvl_jax.load(\"tiny-random\")" in code and "Processor.from_pretrained(\"tiny-random\")" in code
    assert "batch_decode" in code and "apply_chat_template" in code
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                         env=_env(tmp_path / "cache"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip()


def test_readme_setup_is_two_commands_and_ci_runs_the_second():
    setup = _blocks((ROOT / "README.md").read_text(), "bash")[0].strip().splitlines()
    assert len(setup) == 2
    run_it, test_it = setup
    assert run_it.startswith("pip install -e . && qvl-jax generate ") and "torch" not in run_it
    steps = [s.strip() for s in test_it.split("&&")]
    assert steps == ["pip install torch==2.13.0", 'pip install -e ".[test]"', "python -m pytest -q"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    ran = [line.removeprefix("python -m ") for line in ci if line.startswith(("python -m pip", "python -m pytest"))]
    assert ran == [s.removeprefix("python -m ") for s in steps]
    assert any(line.startswith("python3 -m venv") for line in ci)
    example = re.search(r"--image (\S+)", run_it).group(1)
    assert (ROOT / example).is_file()


_PATH = re.compile(r"(?<![\w./~-])((?:qvl_jax|convert|scripts|docs|examples|tests|\.ci)/[\w./{},-]*[\w}])")


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for part in m.group(1).split(",") for q in _expand(path[:m.start()] + part + path[m.end():])]


def test_docs_reference_only_files_that_exist():
    missing = []
    for doc in DOCS:
        for ref in _PATH.findall(doc.read_text()):
            for path in _expand(ref.split("::")[0]):
                if not (ROOT / path).exists():
                    missing.append(f"{doc.name}: {path}")
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------
# start-up and flags


@pytest.mark.parametrize("port", ["99999", "-1", "http", "65536"])
def test_serve_port_out_of_range_is_refused(port, capsys):
    """`serve --port 99999` used to print ':99999' and listen on some other port."""
    from qvl_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--port", port])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("qvl-jax serve: error: argument --port: ")


def test_help_imports_no_jax():
    code = ("import sys\nfrom qvl_jax import cli\n"
            "for argv in (['--help'], ['generate', '--help'], ['info', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "import qvl_jax\n"
            "print(sorted(m for m in ('jax', 'numpy', 'PIL', 'tokenizers', 'flax') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in out and "(default: tiny-random" in out
    assert "(default: None)" not in out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qvl_cache")


@pytest.fixture
def cli_env(cache, monkeypatch):
    monkeypatch.setenv("QVL_JAX_CACHE", str(cache))
    monkeypatch.setenv("QVL_JAX_COMPILATION_CACHE", "0")
    return cache


def _main(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_debug_works_before_and_after_the_subcommand(cli_env, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    rc, _, err = _main(capsys, "info", "--model", missing)
    assert rc == 2 and _one_error_line(err).startswith("error: no model directory")
    for argv in (["--debug", "info", "--model", missing], ["info", "--model", missing, "--debug"],
                 ["generate", "--debug", "--model", missing, "--prompt", "x"]):
        with pytest.raises(CheckpointError):
            cli.main(argv)


def test_sampling_draws_a_fresh_seed_reports_it_and_repeats_with_it(cli_env, capsys):
    args = ("generate", "--prompt", "Hi", "--max-new-tokens", "6", "--json")
    runs = []
    for _ in range(2):
        rc, out, err = _main(capsys, *args, "--temperature", "1.5")
        assert rc == 0, err
        runs.append(json.loads(out))
    seeds = [r["seed"] for r in runs]
    assert all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds) and seeds[0] != seeds[1]
    rc, out, err = _main(capsys, *args, "--temperature", "1.5", "--seed", str(seeds[0]))
    assert rc == 0, err
    assert json.loads(out)["tokens"] == runs[0]["tokens"] and json.loads(out)["seed"] == seeds[0]
    rc, out, err = _main(capsys, *args)
    assert rc == 0 and json.loads(out)["seed"] is None  # greedy: no seed needed
    rc, _, err = _main(capsys, *args, "--temperature", "1.5", "--seed", str(2**64))
    assert rc == 2 and "seed must lie in [0, 2**64)" in _one_error_line(err)


RAW = "ok\x1b]0;title\x07\x1b[2J\r\x9b\x00 tab\there\nnext line é"


def test_control_characters_are_escaped_in_text_output(cli_env, capsys, monkeypatch):
    # Streamed text is made from each token's bytes (qvl_jax.engine.output), the rest by decode: one token.
    monkeypatch.setattr(Processor, "decode", lambda self, ids, skip_special_tokens=True: RAW)
    monkeypatch.setattr(Processor, "token_bytes", lambda self, token_id: RAW.encode())
    for extra in ((), ("--no-stream",)):
        rc, out, err = _main(capsys, "generate", "--prompt", "Hi", "--max-new-tokens", "1", *extra)
        assert rc == 0, err
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), repr(out)
        assert out == "ok\\x1b]0;title\\x07\\x1b[2J\\r\\x9b\\x00 tab\there\nnext line é\n"
    rc, out, err = _main(capsys, "generate", "--prompt", "Hi", "--max-new-tokens", "3", "--json")
    assert rc == 0 and json.loads(out)["text"] == RAW  # --json stays exact (JSON escapes them itself)
    assert cli.escape_controls("a\tb\nc\u200dd\ud800") == "a\tb\nc\u200dd\\ud800"


def test_info_prints_text_by_default(cli_env, capsys):
    rc, out, err = _main(capsys, "info")
    assert rc == 0, err
    assert not out.lstrip().startswith("{") and re.search(r"^parameters\s+\d", out, re.MULTILINE)
    assert re.search(r"^text\s+4 layers", out, re.MULTILINE)
    rc, out, _ = _main(capsys, "info", "--json")
    assert rc == 0 and json.loads(out)["text"]["layers"] == 4


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    # The child takes Python's own SIGINT handler first: a suite started as a background job (`cmd &`
    # in a shell without job control) hands its processes SIGINT ignored, and the CLI then ran on
    # with the stub's None. raise_signal: delivered to the calling thread, raised at once.
    code = ("import signal, sys\nfrom qvl_jax import cli\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "def interrupted(*args, **kwargs):\n    signal.raise_signal(signal.SIGINT)\n"
            "cli.resolve_model = interrupted\n"
            "sys.exit(cli.main(['generate', '--prompt', 'x']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                         env=_env(tmp_path), timeout=120)
    assert run.returncode == 130, run.stderr
    assert run.stderr == "interrupted\n"


def test_permission_denied_is_one_line(cli_env, tmp_path, capsys, monkeypatch):
    import builtins

    # tests run as root, where chmod cannot deny anything: the OS's answer is simulated
    model_dir = hub.resolve_model("tiny-random", log=False)
    real_is_dir, real_open = Path.is_dir, builtins.open
    locked = tmp_path / "locked"

    def is_dir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    with monkeypatch.context() as m:
        m.setattr(Path, "is_dir", is_dir)
        rc, _, err = _main(capsys, "info", "--model", str(locked))
    assert rc == 2 and _one_error_line(err) == f"error: permission denied: {locked}"

    def open_(path, *args, **kwargs):
        if str(path) == str(model_dir / "config.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", open_)
        rc, _, err = _main(capsys, "info", "--model", str(model_dir))
    assert rc == 2 and _one_error_line(err) == f"error: cannot read {model_dir / 'config.json'}: permission denied"

    def denied(args):
        raise PermissionError(13, "Permission denied", "/somewhere/file")

    monkeypatch.setattr(cli, "cmd_info", denied)  # anywhere else: the CLI still says it in one line
    rc, _, err = _main(capsys, "info")
    assert rc == 2 and _one_error_line(err) == "error: permission denied: /somewhere/file"


def test_prompt_that_is_not_utf8(tmp_path):
    run = subprocess.run([sys.executable, "-m", "qvl_jax", "generate", "--prompt", b"caf\xe9 ok"],
                         capture_output=True, text=True, cwd=ROOT, check=False, env=_env(tmp_path), timeout=120)
    assert run.returncode == 2, run.stderr
    assert _one_error_line(run.stderr) == "error: --prompt is not valid UTF-8 (bytes b'\\xe9' at character 3)"


def test_frame_directory_with_a_stray_file_is_one_line(cli_env, tmp_path, capsys):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 50 * i, np.uint8)).save(d / f"{i}.png")
    (d / "readme.txt").write_text("frames of a clip")
    rc, _, err = _main(capsys, "generate", "--video", str(d), "--prompt", "x")
    assert rc == 2 and "holds 'readme.txt', which is not a readable image" in _one_error_line(err)


# ----------------------------------------------------------------------------------------------------
# model resolution (qvl_jax.hub)


def test_edited_hf_files_are_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_JAX_CACHE", str(tmp_path / "cache"))
    hf = write_tiny_checkpoint(tmp_path / "hf")
    first = hub.resolve_model(hf, log=False)
    assert hub.resolve_model(str(hf), log=False) == first  # unchanged: reused, not converted again
    template = hf / "chat_template.jinja"
    template.write_text(template.read_text() + "{{- 'EDITED' }}")
    second = hub.resolve_model(hf, log=False)
    assert second != first and not first.exists()  # the stale conversion is gone
    assert Processor.from_pretrained(second).chat_template.endswith("{{- 'EDITED' }}")
    # every file counts, by name, size and mtime, in sub-directories too
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json", "model.safetensors"):
        key, f = hub.conversion_key(hf), hf / name
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1000))
        assert hub.conversion_key(hf) != key, name
    key = hub.conversion_key(hf)
    (hf / "extra").mkdir()
    (hf / "extra" / "notes.md").write_text("x")
    assert hub.conversion_key(hf) != key


def test_processor_takes_what_load_takes(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("QVL_JAX_CACHE", str(tmp_path))
    proc = Processor.from_pretrained("tiny-random")
    assert proc.eos_token_ids and (tmp_path / "tiny-random" / "tokenizer.json").is_file()
    assert not (tmp_path / "converted").exists()  # a processor needs no converted weights
    assert hub.model_files("tiny-random", log=False) == tmp_path / "tiny-random"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"^cannot download Qwen/Qwen3-VL-2B-Instruct: ") as e:
        Processor.from_pretrained("Qwen/Qwen3-VL-2B-Instruct")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no model directory"):
        hub.resolve_model(str(tmp_path / "a" / "b"), log=False)
