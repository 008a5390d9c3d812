"""LLaVA-NeXT/1.6 captioning and seeded sampling (restore.models.captioners): DreamClear's reference caption.

Official: shallowdream204/DreamClear ``llava/llava_caption.py`` (called by ``test.py``): LLaVA-1.6-vicuna-13B, the
``llava_v1`` conversation asking "Describe this image and its style.", temperature 0.2, top_p 0.7, 512 new tokens.
Everything runs offline on a CPU with ``tiny_llava_next`` / ``tiny_llava`` (the real classes, random weights).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from hydra_helpers import compose_config
from omegaconf import OmegaConf
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from restore import CONFIG_DIR
from restore.data.prompt_extraction import build_prompt_sources
from restore.models.captioners import (
    DREAMCLEAR_INSTRUCTION,
    HIGHLEVEL_INSTRUCTION_OFFICIAL,
    LLAVA15_PROMPT_TEMPLATE,
    LLAVA_V1_PROMPT_TEMPLATE,
    CaptionerNotFoundError,
    MLLMCaptioner,
    _to_uint8_images,
    tiny_llava,
    tiny_llava_next,
)
from tests.captioner_spies import ProcessorSpy

# DreamClear's prompt, written out: conv_llava_v1's system text, " USER: <image>\n", the query, " ASSISTANT:"
# (shallowdream204/DreamClear llava/conversation.py + llava/llava_caption.py).
OFFICIAL_DREAMCLEAR_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nDescribe this image and its style. "
    "ASSISTANT:"
)
DREAMCLEAR_CONFIG = CONFIG_DIR / "method/captioner/dreamclear_llava.yaml"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def nxt() -> MLLMCaptioner:
    return tiny_llava_next(DREAMCLEAR_INSTRUCTION, seed=0)


@pytest.fixture(scope="module")
def saved_next(tmp_path_factory: pytest.TempPathFactory, nxt: MLLMCaptioner) -> Path:
    """The tiny LLaVA-NeXT saved in the llava-hf layout (config, safetensors, processor, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny_llava_next")
    nxt.model.save_pretrained(folder)
    nxt.processor.save_pretrained(folder)
    return folder


def _images() -> list[torch.Tensor]:
    """Two images of different sizes and aspect ratios (LLaVA-NeXT picks a different anyres grid for each) that
    differ in content enough for the random tiny model to tell them apart."""
    ramp = torch.linspace(0, 1, 56)
    wide = torch.stack([ramp.expand(40, 56), 1 - ramp.expand(40, 56), torch.full((40, 56), 0.2)])
    tall = torch.zeros(3, 64, 24)
    tall[0] = 1.0
    return [wide, tall]


def _greedy_as_before(captioner: MLLMCaptioner, images: list[torch.Tensor]) -> list[str]:
    """The captioner's path before sampling existed: processor -> generate(do_sample=False) -> decode the new
    tokens -> text after the marker, newlines -> spaces."""
    pixels = _to_uint8_images(images)
    inputs = captioner.processor(
        images=pixels, text=[captioner.prompt] * len(pixels), return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = captioner.model.generate(**inputs, do_sample=False, max_new_tokens=captioner.max_new_tokens)
    decoded = captioner.processor.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [t.split("ASSISTANT:")[-1].replace("\n", " ").strip() for t in decoded]


# ---------------------------------------------------------------------------------------------- prompt
def test_llava_v1_prompt_is_the_official_string_and_marks_the_answer(nxt: MLLMCaptioner) -> None:
    assert nxt.prompt_template == LLAVA_V1_PROMPT_TEMPLATE and nxt.prompt == OFFICIAL_DREAMCLEAR_PROMPT
    # "ASSISTANT:" is not on a line of its own here: the marker is what follows {instruction}, stripped.
    assert nxt.answer_marker == "ASSISTANT:"
    assert tiny_llava("x").answer_marker == "ASSISTANT:"  # LLaVA-1.5's template: as before
    assert MLLMCaptioner(nxt.model, nxt.processor, "x", "USER: <image>\n{instruction}").answer_marker == ""
    assert nxt._answer("USER: \nDescribe it. ASSISTANT: A red\ncar. ") == "A red car."
    spy = ProcessorSpy(nxt.processor)
    MLLMCaptioner(nxt.model, spy, DREAMCLEAR_INSTRUCTION, LLAVA_V1_PROMPT_TEMPLATE, 2).caption(_images())
    assert spy.texts == [[OFFICIAL_DREAMCLEAR_PROMPT] * 2]  # the official string, once per image


def test_tiny_llava_next_runs_the_real_anyres_path(nxt: MLLMCaptioner) -> None:
    assert isinstance(nxt.model, LlavaNextForConditionalGeneration)
    assert isinstance(nxt.processor, LlavaNextProcessor)
    assert isinstance(nxt.processor.image_processor, LlavaNextImageProcessor)
    images = _images()
    inputs = nxt.processor(
        images=_to_uint8_images(images), text=[nxt.prompt] * 2, return_tensors="pt", padding=True
    )
    assert inputs["image_sizes"].tolist() == [[40, 56], [64, 24]]
    image_tokens = (inputs["input_ids"] == nxt.model.config.image_token_id).sum(1).tolist()
    assert image_tokens[0] != image_tokens[1]  # anyres: the number of image tokens follows the size
    texts = nxt.caption(images)
    assert len(texts) == 2 and all(t and t == t.strip() and "\n" not in t for t in texts)
    assert texts[0] != texts[1]  # the image matters
    assert texts == [
        nxt.caption([img])[0] for img in images
    ]  # left padding: batching changes nothing (greedy)
    assert texts == tiny_llava_next(DREAMCLEAR_INSTRUCTION, seed=0).caption(images)  # same seed, same model


# ---------------------------------------------------------------------------------------------- decoding
def test_greedy_is_the_previous_behaviour(nxt: MLLMCaptioner) -> None:
    high = tiny_llava(HIGHLEVEL_INSTRUCTION_OFFICIAL)
    assert (high.temperature, high.top_p, high.do_sample) == (0.0, None, False)
    for captioner in (high, nxt):
        rng = torch.get_rng_state()
        assert captioner.caption(_images()) == _greedy_as_before(captioner, _images())
        assert torch.equal(torch.get_rng_state(), rng)
    # Greedy ignores the seed and top_p.
    assert nxt.with_instruction(nxt.instruction, seed=5, top_p=0.5).caption(_images()) == nxt.caption(
        _images()
    )


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(
    nxt: MLLMCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = nxt.with_instruction(nxt.instruction, temperature=1.0, top_p=0.9, seed=0)
    assert sampler.model is nxt.model and sampler.do_sample
    calls: list[dict] = []
    generate = sampler.model.generate

    def spy(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return generate(**kwargs)

    monkeypatch.setattr(sampler.model, "generate", spy)
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    first = sampler.caption(_images())
    assert torch.equal(torch.rand(4), expected_draw)  # the caller's RNG did not move
    assert calls[0] == {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}
    assert sampler.caption(_images()) == first  # seeded per call: the same images give the same texts
    assert first != nxt.caption(_images())  # it does sample
    assert sampler.with_instruction(sampler.instruction, seed=1).caption(_images()) != first
    assert tiny_llava_next(seed=0, temperature=1.0, top_p=0.9).caption(_images()) == first


def test_decoding_arguments_are_checked_and_passed_on(nxt: MLLMCaptioner) -> None:
    with pytest.raises(ValueError, match="temperature"):
        MLLMCaptioner(nxt.model, nxt.processor, "x", temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        MLLMCaptioner(nxt.model, nxt.processor, "x", temperature=0.2, top_p=0.0)
    dream = nxt.with_instruction("y", temperature=0.2, top_p=0.7, seed=3)
    assert (dream.temperature, dream.top_p, dream.seed, dream.prompt_template) == (
        0.2,
        0.7,
        3,
        LLAVA_V1_PROMPT_TEMPLATE,
    )
    kept = dream.with_instruction("z")  # unset arguments keep the captioner's
    assert (kept.temperature, kept.top_p, kept.seed, kept.instruction) == (0.2, 0.7, 3, "z")
    assert "temperature=0.2, top_p=0.7" in repr(dream).split("\n")[1]
    # from_pretrained and the constructor agree on the defaults (prompt extraction builds shared ones directly).
    init, load = (
        inspect.signature(f).parameters for f in (MLLMCaptioner.__init__, MLLMCaptioner.from_pretrained)
    )
    for key in ("prompt_template", "max_new_tokens", "temperature", "top_p", "seed"):
        assert init[key].default == load[key].default, key


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("model_class", [LlavaNextForConditionalGeneration, LlavaForConditionalGeneration])
def test_from_pretrained_loads_any_llava_class(
    model_class: type, tmp_path: Path, nxt: MLLMCaptioner, saved_next: Path
) -> None:
    """A llava-hf folder loads as the class its config.json names (AutoModelForImageTextToText) and captions as
    the model it was saved from, greedy and sampled."""
    if model_class is LlavaNextForConditionalGeneration:
        original, folder = nxt, saved_next
    else:
        original, folder = tiny_llava(DREAMCLEAR_INSTRUCTION), tmp_path
        original.model.save_pretrained(folder)
        original.processor.save_pretrained(folder)
    loaded = MLLMCaptioner.from_pretrained(
        str(folder),
        DREAMCLEAR_INSTRUCTION,
        original.prompt_template,
        max_new_tokens=8,
        local_files_only=True,
    )
    assert type(loaded.model) is model_class and loaded.source == str(folder)
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    texts = loaded.caption(_images())
    assert texts == original.caption(_images()) and len(texts) == 2
    sampled = MLLMCaptioner.from_pretrained(
        str(folder),
        DREAMCLEAR_INSTRUCTION,
        original.prompt_template,
        max_new_tokens=8,
        local_files_only=True,
        temperature=1.0,
        top_p=0.9,
        seed=0,
    )
    assert sampled.caption(_images()) == original.with_instruction(
        original.instruction, temperature=1.0, top_p=0.9, seed=0
    ).caption(_images())


def test_missing_llava_next_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(CaptionerNotFoundError) as err:
        MLLMCaptioner.from_pretrained("llava-hf/llava-v1.6-vicuna-13b-hf", "x", local_files_only=True)
    msg = str(err.value)
    assert "'llava-hf/llava-v1.6-vicuna-13b-hf'" in msg and "huggingface-cli download" in msg
    assert "LlavaNextForConditionalGeneration" in msg and "LlavaNextProcessor" in msg
    assert "convert_llava_next_weights_to_hf.py" in msg and "preprocessor_config.json" in msg


# ---------------------------------------------------------------------------------------------- configs
def test_dreamclear_llava_config_is_the_official_captioner(tmp_path: Path, saved_next: Path) -> None:
    cfg = OmegaConf.load(DREAMCLEAR_CONFIG)
    keys = set(cfg) - {"_target_", "_partial_"}
    params = inspect.signature(MLLMCaptioner.from_pretrained).parameters
    assert keys <= set(params), f"keys not in from_pretrained: {keys - set(params)}"
    assert cfg._target_ == "restore.models.captioners.MLLMCaptioner.from_pretrained" and cfg._partial_
    assert cfg.model_id_or_path == "llava-hf/llava-v1.6-vicuna-13b-hf"
    assert cfg.instruction == DREAMCLEAR_INSTRUCTION and cfg.prompt_template == LLAVA_V1_PROMPT_TEMPLATE
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.torch_dtype) == (0.2, 0.7, 512, "float16")
    # The method config composes with it (as eval.py would).
    composed = compose_config("eval", ["method=dreamclear"], tmp_path)
    assert OmegaConf.to_container(composed.method.captioner) == OmegaConf.to_container(cfg)
    # Instantiated (Hydra _partial_: a factory the method calls on first use) on the saved tiny LLaVA-NeXT.
    factory = instantiate(cfg, model_id_or_path=str(saved_next), local_files_only=True, max_new_tokens=4)
    captioner = factory()
    assert isinstance(captioner.model, LlavaNextForConditionalGeneration)
    assert next(captioner.model.parameters()).dtype == torch.float16
    assert (captioner.temperature, captioner.top_p, captioner.seed) == (0.2, 0.7, 0)
    assert captioner.prompt == OFFICIAL_DREAMCLEAR_PROMPT and captioner.max_new_tokens == 4
    with pytest.raises(
        CaptionerNotFoundError, match="huggingface-cli download llava-hf/llava-v1.6-vicuna-13b-hf"
    ):
        instantiate(cfg, local_files_only=True)()  # no 13B weights here: the message names the fix


def test_prompt_extraction_builds_the_dreamclear_captioner(saved_next: Path, nxt: MLLMCaptioner) -> None:
    """``--field caption=dreamclear_llava``: built at once (not the config's _partial_ factory) with its prompt
    and sampling; a second config on the same checkpoint shares the weights but keeps its own (greedy) decoding;
    --tiny and tiny_llava_next keep the llava_v1 prompt and the sampling."""
    paths = {"caption": str(saved_next), "highlevel": str(saved_next)}
    sources = build_prompt_sources(
        {"caption": "dreamclear_llava", "highlevel": "llava15_7b"},
        torch_dtype="float32",
        model_paths=paths,
        max_new_tokens=4,
    )
    caption, high = sources["caption"].__self__, sources["highlevel"].__self__
    assert isinstance(caption, MLLMCaptioner) and high.model is caption.model
    assert (caption.temperature, caption.top_p, caption.prompt) == (0.2, 0.7, OFFICIAL_DREAMCLEAR_PROMPT)
    assert (high.temperature, high.top_p, high.prompt_template) == (0.0, None, LLAVA15_PROMPT_TEMPLATE)
    texts = sources["caption"](_images())
    assert texts == nxt.with_instruction(
        nxt.instruction, max_new_tokens=4, temperature=0.2, top_p=0.7
    ).caption(_images())
    tiny = build_prompt_sources({"caption": "dreamclear_llava"}, tiny=True)["caption"].__self__
    assert (tiny.prompt, tiny.temperature, tiny.top_p) == (OFFICIAL_DREAMCLEAR_PROMPT, 0.2, 0.7)
    small = build_prompt_sources({"caption": "tiny_llava_next"}, max_new_tokens=3)["caption"].__self__
    assert isinstance(small.model, LlavaNextForConditionalGeneration) and small.max_new_tokens == 3
    assert (small.prompt, small.temperature, small.top_p) == (OFFICIAL_DREAMCLEAR_PROMPT, 0.2, 0.7)
