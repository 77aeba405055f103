"""Tokenizer files, chat templates and the Processor, against transformers.

Every expected value comes from transformers (its Qwen2Tokenizer / PreTrainedTokenizerFast loading our
tokenizer directory, its chat-template renderer, its Qwen3VLProcessor) or is written by hand here.
transformers' Qwen3VLProcessor is built from our tokenizer directory, the PIL image processor
(`Qwen2VLImageProcessorPil`, what AutoImageProcessor gives without torchvision) and
`Qwen3VLVideoProcessor`; torchvision is not installed, so its class check is bypassed at construction,
and for videos the four torchvision functions it calls get a PIL-based stand-in (as in
test_image_processing.py): the prompt expansion, timestamps and grids it produces are its own code.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.processing_utils import ProcessorMixin

from hf_reference import IMAGE_CONFIG, VIDEO_CONFIG, install_torchvision_stand_in, one_line_error
from qvl_jax.errors import CheckpointError, ConfigError, InputError
from qvl_jax.processing.processor import QWEN3_VL_CHAT_TEMPLATE, Processor
from qvl_jax.processing.tokenizer_files import write_tiny_tokenizer

STRINGS = [
    "Hello world!",
    "Describe this image in detail, please.",
    "héllo wörld — naïve café, 你好，世界 🙂🚀 e\u0301 \t tabs\n\nnew lines   trailing  ",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nhmm</think><tool_call>{\"a\": 1}</tool_call><|endoftext|><|video_pad|><|fim_pad|>",
    "def f(x):\n    return x ** 2  # 3.14159 and 2025-01-01",
    "<|im_start|<|im_end|>>",  # almost-tokens next to tokens
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_tok")
    ids = write_tiny_tokenizer(d)
    (d / "preprocessor_config.json").write_text(json.dumps(IMAGE_CONFIG))
    (d / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return d, ids


@pytest.fixture(scope="module")
def proc(model_dir):
    return Processor.from_pretrained(model_dir[0])


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir[0]))


@pytest.fixture(scope="module")
def hf_proc(model_dir, hf_tok):
    d = model_dir[0]
    image_processor = AutoImageProcessor.from_pretrained(str(d))
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    video_kwargs = {k: v for k, v in VIDEO_CONFIG.items() if not k.endswith(("_class", "_type"))}
    with pytest.MonkeyPatch.context() as mp:
        # the class check looks the video processor base class up by name, which needs torchvision
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=hf_tok,
                                video_processor=Qwen3VLVideoProcessor(**video_kwargs),
                                chat_template=(d / "chat_template.jinja").read_text())


def pixels(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def image(h, w, seed):
    return Image.fromarray(pixels((h, w, 3), seed))


# ----------------------------------------------------------------------------------------------------
# tokenizer files


def test_tokenizer_round_trip_and_special_tokens(proc, model_dir):
    _, ids = model_dir
    for s in STRINGS[:3] + STRINGS[5:6]:
        encoded = proc.encode(s)
        assert all(0 <= i < 512 for i in encoded)
        # NFC normalisation is part of Qwen's tokenizer: e + combining acute decodes as é
        assert proc.decode(encoded) == s.replace("e\u0301", "é")
    assert len(proc.encode("Describe this image")) < len("Describe this image")  # merges exist
    specials = {"<|im_start|>": ids["im_start_token_id"], "<|im_end|>": ids["im_end_token_id"],
                "<|endoftext|>": ids["endoftext_token_id"], "<|image_pad|>": ids["image_token_id"],
                "<|video_pad|>": ids["video_token_id"], "<|vision_start|>": ids["vision_start_token_id"],
                "<|vision_end|>": ids["vision_end_token_id"]}
    assert len(set(specials.values())) == len(specials)
    for token, token_id in specials.items():
        assert proc.encode(token) == [token_id]
        assert proc.decode([token_id], skip_special_tokens=False) == token
        assert proc.decode([token_id]) == ""
    # <think> is an added token but not a special one, as in Qwen: it survives skip_special_tokens
    think = proc.encode("<think>")
    assert len(think) == 1 and proc.decode(think) == "<think>"
    assert ids["eos_token_id"] == [ids["im_end_token_id"], ids["endoftext_token_id"]]
    assert ids["pad_token_id"] == ids["endoftext_token_id"]
    assert proc.eos_token_ids == ids["eos_token_id"] and proc.pad_token_id == ids["pad_token_id"]


def test_written_ids_match_what_transformers_reads(model_dir, hf_tok):
    _, ids = model_dir
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    assert ids["image_token_id"] == hf_tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids["video_token_id"] == hf_tok.convert_tokens_to_ids("<|video_pad|>")
    assert ids["vision_start_token_id"] == hf_tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids["vision_end_token_id"] == hf_tok.convert_tokens_to_ids("<|vision_end|>")
    assert ids["eos_token_id"][0] == hf_tok.eos_token_id == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert ids["pad_token_id"] == hf_tok.pad_token_id == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert hf_tok.bos_token is None and ids["bos_token_id"] is None
    assert len(hf_tok) == 512 and max(hf_tok.get_vocab().values()) == 511


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_transformers_tokenizer_gives_the_same_ids(loader, model_dir, proc, hf_tok):
    hf = hf_tok if loader == "AutoTokenizer" else PreTrainedTokenizerFast.from_pretrained(str(model_dir[0]))
    for s in STRINGS:
        expected = hf(s)["input_ids"]
        assert proc.encode(s) == expected, s
        for skip in (True, False):
            assert proc.decode(expected, skip_special_tokens=skip) == hf.decode(expected, skip_special_tokens=skip)
    batch = hf(STRINGS[:3], padding=True, padding_side="left", return_tensors="np")["input_ids"]
    assert proc.batch_decode(batch) == hf.batch_decode(batch, skip_special_tokens=True)
    assert proc.batch_decode(batch.tolist(), skip_special_tokens=False) == hf.batch_decode(batch)


@pytest.mark.parametrize("vocab_size", [282, 300, 1000])
def test_other_vocab_sizes(vocab_size, tmp_path):
    ids = write_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert max(hf.get_vocab().values()) < vocab_size
    assert hf.convert_tokens_to_ids("<|image_pad|>") == ids["image_token_id"]
    ours = Processor.from_pretrained(tmp_path)
    for s in STRINGS:
        assert ours.encode(s) == hf(s)["input_ids"]


def test_written_files_are_deterministic(tmp_path):
    write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_vocab_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_tokenizer(tmp_path, vocab_size=281)


# ----------------------------------------------------------------------------------------------------
# chat templates


def test_builtin_template_is_qwen_format(proc):
    # written by hand from Qwen3-VL's documented prompt format
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi?"}]}]
    assert proc.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "S."}, {"role": "user", "content": "U."},
              {"role": "assistant", "content": "A."}]
    assert proc.apply_chat_template(system) == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nU.<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    )


IMG = Image.new("RGB", (40, 30), (10, 200, 30))
FRAMES = [Image.new("RGB", (40, 30), (i, i, i)) for i in range(0, 80, 10)]

CHATS = {
    "text_only": [{"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]}],
    "string_content": [{"role": "user", "content": "Plain string content"}],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": IMG},
                                               {"type": "text", "text": "What is this?"}]}],
    "several_images": [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": IMG}, {"type": "text", "text": " and "},
        {"type": "image", "image": "file.png"}, {"type": "image", "url": "other.jpg"},
        {"type": "image_url", "image_url": {"url": "third.png"}}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": FRAMES},
                                           {"type": "text", "text": "What happens?"}]}],
    "image_and_video": [{"role": "user", "content": [{"type": "video", "video": np.zeros((4, 8, 8, 3), np.uint8)},
                                                     {"type": "image", "image": IMG},
                                                     {"type": "text", "text": "Same scene?"}]}],
    "multi_turn": [
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": "Yes, green."},
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "And this?"}]},
    ],
    "system_string": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "system_list": [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
                    {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "?"}]}],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris <FR> & co", "é": 1}}},
            {"type": "function", "function": {"name": "time", "arguments": "{\"tz\": \"CET\"}"}}]},
        {"role": "tool", "content": "18°C"},
        {"role": "tool", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "map"}]},
        {"role": "user", "content": "Thanks", "tool_calls": None},
    ],
}


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_template_file_renders_as_transformers(name, generation_prompt, model_dir, hf_proc, hf_tok, tmp_path):
    # a template FILE in a fresh checkpoint directory, read back by both sides
    d = tmp_path / "ckpt"
    shutil.copytree(model_dir[0], d)
    (d / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    ours = Processor.from_pretrained(d)
    messages = CHATS[name]
    expected = hf_proc.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
    # the tokenizer-level renderer (the template our tokenizer dir carries) agrees too
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) == expected
    # a batch renders each conversation alone
    assert ours.apply_chat_template([messages, CHATS["text_only"]], add_generation_prompt=generation_prompt) == \
        hf_proc.apply_chat_template([messages, CHATS["text_only"]], add_generation_prompt=generation_prompt)


def test_template_variables_and_tools(proc, hf_proc):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather <now> & 'later' ü",
                                               "parameters": parameters}}]
    messages = CHATS["system_string"]
    for kwargs in ({"tools": tools}, {"add_vision_id": True}):
        for chat in (messages, CHATS["several_images"], CHATS["image_and_video"]):
            assert proc.apply_chat_template(chat, add_generation_prompt=True, **kwargs) == \
                hf_proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kwargs)


# Exercises the environment rather than Qwen's template: whitespace control, loop controls,
# namespace, dict(), tojson options, raise_exception, special-token variables, {% generation %}.
ENV_TEMPLATE = """{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}
{% set ns = namespace(n=0, seen=[]) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
  [{{ loop.index }}:{{ m.role }}] {{ m.content if m.content is string else m.content | tojson }}
    {% if m.role == 'assistant' %}{% generation %}<gen>{{ m.content }}</gen>{% endgeneration %}{% endif %}
{% endfor %}
{{ ns.n }} {{ dict(a=1, b=[1, 2]) | tojson(indent=2, sort_keys=true) }} {{ {"<x>": "é&"} | tojson }}
{% if add_generation_prompt %}GEN{% endif %}
{% if messages | length > 5 %}{{ raise_exception('too many messages: ' ~ messages | length) }}{% endif %}
{{ strftime_now('%Y') | length }}
"""


def test_jinja_environment_matches_transformers(proc, hf_proc):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "q"}]},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "answer", "reasoning_content": None},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never"},
    ]
    for gen in (True, False):
        expected = hf_proc.apply_chat_template(messages, chat_template=ENV_TEMPLATE, add_generation_prompt=gen)
        assert proc.apply_chat_template(messages, chat_template=ENV_TEMPLATE, add_generation_prompt=gen) == expected
    too_many = messages + [{"role": "user", "content": "sixth"}]
    with pytest.raises(Exception, match="too many messages: 6"):
        hf_proc.apply_chat_template(too_many, chat_template=ENV_TEMPLATE)
    one_line_error(InputError, lambda: proc.apply_chat_template(too_many, chat_template=ENV_TEMPLATE),
                   "chat template rejected the messages: too many messages: 6")


def test_continue_final_message_matches_transformers(proc, hf_proc):
    prefilled = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}],
        [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "gr  "}]}],
    ]
    for messages in prefilled:
        expected = hf_proc.apply_chat_template(messages, continue_final_message=True)
        assert proc.apply_chat_template(messages, continue_final_message=True) == expected
        assert not expected.endswith("<|im_end|>\n")  # the turn really is left open
    one_line_error(InputError, lambda: proc.apply_chat_template(prefilled[0], continue_final_message=True,
                                                                add_generation_prompt=True), "cannot both be set")
    no_text = [{"role": "user", "content": [{"type": "image", "image": IMG}]}]
    one_line_error(InputError, lambda: proc.apply_chat_template(no_text, continue_final_message=True),
                   "no text to continue")


def test_reasoning_fields_are_aliased_as_transformers(proc, hf_proc):
    template = "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}/{{ m.thinking }}/{{ m.content }};" \
               "{% endfor %}"
    messages = [{"role": "assistant", "content": "a", "reasoning": "r1"},
                {"role": "assistant", "content": "b", "thinking": "r2"}, {"role": "user", "content": "c"}]
    assert proc.apply_chat_template(messages, chat_template=template) == \
        hf_proc.apply_chat_template(messages, chat_template=template)


# ----------------------------------------------------------------------------------------------------
# processor outputs


def assert_same_inputs(ours, ref, keys):
    assert set(ours) == set(keys)
    for key in keys:
        expected = np.asarray(ref[key])
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        if key.startswith("pixel_values"):
            assert np.abs(ours[key] - expected).max() <= 1e-5, key
        else:
            np.testing.assert_array_equal(ours[key], expected, err_msg=key)


TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
IMAGE_KEYS = TEXT_KEYS + ("pixel_values", "image_grid_thw")
VIDEO_KEYS = TEXT_KEYS + ("pixel_values_videos", "video_grid_thw")
PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def test_one_image_matches_transformers(proc, hf_proc):
    text = f"<|im_start|>user\n{PAD}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    img = image(300, 420, 1)
    ref = hf_proc(text=text, images=img, return_tensors="np")
    out = proc(text=text, images=img)
    assert_same_inputs(out, ref, IMAGE_KEYS)
    # hand check: 300x420 -> 288x416 (nearest multiples of 32) -> 18x26 patches -> 117 merged tokens
    assert out["image_grid_thw"].tolist() == [[1, 18, 26]]
    assert (out["input_ids"] == proc.image_token_id).sum() == 117 == (out["mm_token_type_ids"] == 1).sum()


def test_several_images_match_transformers(proc, hf_proc, tmp_path):
    path = tmp_path / "img.png"
    image(90, 500, 3).save(path)
    images = [image(256, 256, 2), str(path), pixels((700, 300, 3), 4)]
    text = f"<|im_start|>user\nFirst {PAD} then {PAD}{PAD} compare.<|im_end|>\n<|im_start|>assistant\n"
    assert_same_inputs(proc(text=text, images=images), hf_proc(text=text, images=images, return_tensors="np"),
                       IMAGE_KEYS)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(side, proc, hf_proc):
    texts = [f"<|im_start|>user\n{PAD}Short?<|im_end|>\n<|im_start|>assistant\n",
             f"<|im_start|>user\nA much longer prompt {PAD} with {PAD} two images.<|im_end|>\n<|im_start|>assistant\n"]
    images = [[image(260, 300, 5)], [image(320, 320, 6), image(400, 256, 7)]]
    ref = hf_proc(text=texts, images=images, padding=True, padding_side=side, return_tensors="np")
    out = proc(text=texts, images=images, padding=True, padding_side=side)
    assert_same_inputs(out, ref, IMAGE_KEYS)
    assert out["attention_mask"].min() == 0  # the batch really is padded
    # text only, in a batch
    plain = ["Hello", "A longer one, with more words in it."]
    assert_same_inputs(proc(text=plain, padding_side=side),
                       hf_proc(text=plain, padding=True, padding_side=side, return_tensors="np"), TEXT_KEYS)


def test_chat_to_inputs_matches_transformers(proc, hf_proc):
    convs = [CHATS["multi_turn"], CHATS["system_list"]]
    kwargs = {"padding": True, "padding_side": "left"}
    ref = hf_proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="np", processor_kwargs=kwargs)
    out = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
    assert_same_inputs(out, ref, IMAGE_KEYS)
    ids = proc.apply_chat_template(CHATS["one_image"], add_generation_prompt=True, tokenize=True)
    np.testing.assert_array_equal(ids, hf_proc.apply_chat_template(CHATS["one_image"], add_generation_prompt=True,
                                                                   tokenize=True, return_tensors="np"))


# ----------------------------------------------------------------------------------------------------
# video: transformers' processor with a PIL stand-in for torchvision


@pytest.fixture
def torchvision_stand_in(monkeypatch):
    install_torchvision_stand_in(monkeypatch)


VPAD = "<|vision_start|><|video_pad|><|vision_end|>"

VIDEO_CASES = {
    # name: (videos, source fps per video (None: unknown, 24 on both sides))
    "array_30fps": ([pixels((37, 48, 80, 3), 10)], [30.0]),
    "pil_frames_2fps": ([[Image.fromarray(f) for f in pixels((8, 45, 77, 3), 11)]], [2.0]),
    "odd_frames_unknown_fps": ([pixels((5, 64, 40, 3), 12)], [None]),
    "two_videos": ([pixels((30, 50, 70, 3), 13), pixels((12, 90, 34, 3), 14)], [15.0, 3.0]),
}


@pytest.mark.parametrize("name", sorted(VIDEO_CASES))
def test_video_prompt_matches_transformers(name, proc, hf_proc, torchvision_stand_in):
    videos, rates = VIDEO_CASES[name]
    text = f"<|im_start|>user\n{VPAD * len(videos)}Describe.<|im_end|>\n<|im_start|>assistant\n"
    kwargs = {"cap_pixels_per_frame": False}
    if any(r is not None for r in rates):
        kwargs["video_metadata"] = [{"fps": r, "total_num_frames": len(v)} for v, r in zip(videos, rates)]
    ref = hf_proc(text=text, videos=videos, return_tensors="np", **kwargs)
    out = proc(text=text, videos=videos, video_fps=rates if len(rates) > 1 else rates[0])
    assert_same_inputs(out, ref, VIDEO_KEYS)
    # transformers' own metadata form is accepted too
    if "video_metadata" in kwargs:
        again = proc(text=text, videos=videos, video_metadata=kwargs["video_metadata"])
        np.testing.assert_array_equal(again["input_ids"], out["input_ids"])


def test_video_timestamps_by_hand(proc):
    # 8 frames at 2 fps, sampled at 2 fps: all 8 kept; steps at (0+0.5)/2, (1+1.5)/2, ... seconds,
    # printed with one decimal (0.25 -> "0.2", Python's round-half-even formatting)
    out = proc(text=f"{VPAD}", videos=pixels((8, 64, 64, 3), 20), video_fps=2.0)
    text = proc.decode(out["input_ids"][0], skip_special_tokens=False)
    frame = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert out["video_grid_thw"].tolist() == [[4, 4, 4]]
    # the template's <|vision_start|><|video_pad|><|vision_end|> is replaced whole: no outer pair around the
    # frames (Qwen's processor; transformers 5.0-5.24 kept one, 5.25 dropped it again)
    assert text == "".join(f"<{t} seconds>{frame}" for t in ("0.2", "1.2", "2.2", "3.2"))
    bare = proc(text="<|video_pad|>", videos=pixels((8, 64, 64, 3), 20), video_fps=2.0)
    np.testing.assert_array_equal(bare["input_ids"], out["input_ids"])  # a bare placeholder expands the same
    assert (out["mm_token_type_ids"] == 2).sum() == 16 and (out["mm_token_type_ids"] == 1).sum() == 0


def test_video_chat_matches_transformers(proc, hf_proc, torchvision_stand_in):
    messages = [{"role": "user", "content": [{"type": "video", "video": pixels((12, 40, 56, 3), 21)},
                                             {"type": "image", "image": image(256, 300, 22)},
                                             {"type": "text", "text": "Same?"}]}]
    ref = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="np", processor_kwargs={"cap_pixels_per_frame": False})
    out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_same_inputs(out, ref, IMAGE_KEYS + VIDEO_KEYS[3:])
    # a source rate given on the content item reaches the video processor
    messages[0]["content"][0]["video_fps"] = 6.0
    with_rate = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ref = hf_proc.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np",
        processor_kwargs={"cap_pixels_per_frame": False, "video_metadata": [{"fps": 6.0, "total_num_frames": 12}]})
    assert_same_inputs(with_rate, ref, IMAGE_KEYS + VIDEO_KEYS[3:])


# ----------------------------------------------------------------------------------------------------
# checkpoint files


def test_chat_template_sources(model_dir, tmp_path):
    src = model_dir[0]

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "chat_template.jinja").unlink()
        return d

    d = fresh("json")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "from json {{ messages | length }}"}))
    assert Processor.from_pretrained(d).chat_template == "from json {{ messages | length }}"
    d = fresh("tokenizer_config")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "no"}, {"name": "default", "template": "from config"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Processor.from_pretrained(d).chat_template == "from config"
    d = fresh("none")
    proc = Processor.from_pretrained(d)
    assert proc.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n"
    # without preprocessor configs the Qwen3-VL defaults apply
    (d / "preprocessor_config.json").unlink()
    (d / "video_preprocessor_config.json").unlink()
    proc = Processor.from_pretrained(d)
    assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (65536, 16777216)


def test_bad_checkpoint_directories(model_dir, tmp_path):
    one_line_error(CheckpointError, lambda: Processor.from_pretrained(tmp_path / "missing"), "no such model directory")
    one_line_error(CheckpointError, lambda: Processor.from_pretrained(tmp_path), "has no tokenizer.json")
    d = tmp_path / "ckpt"
    shutil.copytree(model_dir[0], d)
    (d / "tokenizer.json").write_text("{ not json")
    one_line_error(CheckpointError, lambda: Processor.from_pretrained(d), "cannot read .*tokenizer.json")
    shutil.copy(model_dir[0] / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("[1, 2]")
    one_line_error(CheckpointError, lambda: Processor.from_pretrained(d), "must hold a JSON object")
    # a text-only Qwen tokenizer (no vision tokens) is not enough
    tok = json.loads((model_dir[0] / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|image_pad|>"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text("{}")
    one_line_error(ConfigError, lambda: Processor.from_pretrained(d), r"no <\|image_pad\|> token")
    (d / "chat_template.jinja").write_text("{% if %}")
    shutil.copy(model_dir[0] / "tokenizer.json", d / "tokenizer.json")
    proc = Processor.from_pretrained(d)
    one_line_error(ConfigError, lambda: proc.apply_chat_template([{"role": "user", "content": "x"}]),
                   "chat template does not parse")


# ----------------------------------------------------------------------------------------------------
# input errors: one line, naming the problem


def test_placeholder_count_errors(proc):
    img = image(64, 64, 30)
    one_line_error(InputError, lambda: proc(text=f"{PAD}{PAD}", images=[img]),
                   r"2 <\|image_pad\|> placeholder\(s\) but 1 image\(s\)")
    one_line_error(InputError, lambda: proc(text=f"{PAD}", images=[img, img]),
                   r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\)")
    one_line_error(InputError, lambda: proc(text="no placeholder", images=img), r"0 <\|image_pad\|>")
    one_line_error(InputError, lambda: proc(text=PAD), r"1 <\|image_pad\|> placeholder\(s\) but 0 image")
    one_line_error(InputError, lambda: proc(text=[VPAD, VPAD], videos=[pixels((4, 32, 32, 3), 1)]),
                   r"2 <\|video_pad\|> placeholder\(s\) but 1 video")
    one_line_error(InputError, lambda: proc(text="x", videos=pixels((4, 32, 32, 3), 1)), r"0 <\|video_pad\|>")
    # media in a message the template does not render (assistant turns)
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "image": img}, {"type": "text", "text": "a"}]}]
    one_line_error(InputError, lambda: proc.apply_chat_template(messages, tokenize=True),
                   r"1 image item\(s\) but the chat template wrote 0")


def test_text_and_option_errors(proc):
    one_line_error(InputError, lambda: proc(text=123), "text must be a string or a list of strings, got int")
    one_line_error(InputError, lambda: proc(text=["ok", 5]), "item 1 is int")
    one_line_error(InputError, lambda: proc(text=[]), "empty list")
    one_line_error(InputError, lambda: proc(), "nothing to process")
    one_line_error(InputError, lambda: proc(text=["a", "a much longer prompt"], padding=False), "padding=True")
    one_line_error(InputError, lambda: proc(text="a", padding_side="middle"), "padding_side")
    one_line_error(InputError, lambda: proc(text="a", return_tensors="pt"), "numpy arrays only")
    one_line_error(InputError, lambda: proc(text=PAD, images=42), "unsupported image type int")
    one_line_error(InputError, lambda: proc.decode([[1, 2]]), "1-D")
    one_line_error(InputError, lambda: proc.batch_decode(np.zeros(3, np.int64)), r"\[batch, length\]")


BAD_MESSAGES = {
    "not_a_list": ({"role": "user", "content": "x"}, "messages must be a list of message dicts"),
    "empty": ([], "messages is empty"),
    "empty_conversation_in_batch": ([[{"role": "user", "content": "x"}], []], "conversation 1 is empty"),
    "message_not_a_dict": (["hello"], r"message 0: expected a dict with 'role' and 'content', got str"),
    "no_role": ([{"content": "no role"}], r"message 0: 'role' must be a string"),
    "bad_content": ([{"role": "user", "content": 5}], r"message 0 \(user\): 'content' must be a string or a list"),
    "unknown_type": ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
                     r"message 0 \(user\), content item 0: unknown content type 'audio'; expected one of 'text', "
                     r"'image', 'video'"),
    "no_type": ([{"role": "user", "content": [{"text": "no type"}]}], r"content item 0: no 'type'"),
    "item_not_a_dict": ([{"role": "user", "content": ["just a string"]}], r"content item 0: expected a dict"),
    "text_not_a_string": ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
                          r"'text' must be a string, got int"),
    "image_without_image": ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}],
                            r"content item 1: image item has no 'image', 'url' or 'path' key"),
    "video_without_video": ([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "video"}]}],
                            r"message 1 \(user\), content item 0: video item has no 'video'"),
    "bad_type_in_batch": ([[{"role": "user", "content": "x"}], [{"role": "user", "content": [{"type": "pdf"}]}]],
                          r"conversation 1, message 0 \(user\), content item 0: unknown content type 'pdf'"),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_bad_messages(name, proc):
    messages, pattern = BAD_MESSAGES[name]
    one_line_error(InputError, lambda: proc.apply_chat_template(messages, tokenize=True), pattern)
