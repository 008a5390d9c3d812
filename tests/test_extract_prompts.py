"""MLLM captioners (XPSR's high- and low-level prompts) and the resumable prompt side-file extraction (scripts/extract_prompts.py).

Everything runs offline on a CPU: the captioner is ``tiny_llava`` (the real LLaVA classes, random weights) and
the tagger the tiny DAPE.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from restore import CONFIG_DIR, PROJECT_ROOT
from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES, EmbeddedPhotos
from restore.data.image_io import read_image, to_tensor, write_image
from restore.data.prompt_extraction import (
    build_prompt_sources,
    dape_tagger,
    extract_prompts,
    folder_entries,
    parse_field_specs,
    read_side_file,
)
from restore.data.prompts import PromptTable
from restore.models.captioners import (
    HIGHLEVEL_INSTRUCTION_OFFICIAL,
    HIGHLEVEL_INSTRUCTION_PAPER,
    LLAVA15_PROMPT_TEMPLATE,
    LOWLEVEL_INSTRUCTION_OFFICIAL,
    OFFICIAL_MAX_LENGTH,
    CaptionerNotFoundError,
    MLLMCaptioner,
    _to_uint8_images,
    tiny_llava,
)
from restore.models.dape import load_dape
from restore.weights.manifest import MissingWeightsError
from tests.captioner_spies import ProcessorSpy

# The official high-level prompt, verbatim (qyp2000/XPSR utils_data/highlevel_prompt_{train,test}.py).
OFFICIAL_HIGHLEVEL_PROMPT = (
    "<image>\nUSER: Please provide a descriptive summary of the content of this image. \nASSISTANT:"
)


def _script():
    spec = importlib.util.spec_from_file_location(
        "extract_prompts", PROJECT_ROOT / "scripts/extract_prompts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Counting:
    """A prompt source wrapper that records how many images each call got."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, images):
        self.calls.append(len(images))
        return self.fn(images)

    @property
    def images(self) -> int:
        return sum(self.calls)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def high() -> MLLMCaptioner:
    return tiny_llava(HIGHLEVEL_INSTRUCTION_OFFICIAL, seed=0)


@pytest.fixture(scope="module")
def low() -> MLLMCaptioner:
    return tiny_llava(LOWLEVEL_INSTRUCTION_OFFICIAL, seed=0)


def _images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 40, 56, generator=g), torch.rand(3, 64, 24, generator=g)]


# ---------------------------------------------------------------------------------------------- captioner
def test_tiny_llava_captions_batched_deterministic(high: MLLMCaptioner) -> None:
    a, b = _images()
    both = high.caption([a, b])
    assert len(both) == 2 and all(isinstance(t, str) and t.strip() == t and t for t in both)
    assert "\n" not in "".join(both)
    assert both == [high.caption([a])[0], high.caption([b])[0]]  # batching changes nothing
    assert both == tiny_llava(HIGHLEVEL_INSTRUCTION_OFFICIAL, seed=0).caption([a, b])  # same seed, same text
    assert both != tiny_llava(HIGHLEVEL_INSTRUCTION_OFFICIAL, seed=1).caption([a, b])
    assert both != tiny_llava(LOWLEVEL_INSTRUCTION_OFFICIAL, seed=0).caption(
        [a, b]
    )  # the instruction matters
    same_size = torch.stack([a[:, :24, :24], b[:, :24, :24]])  # a [B, 3, H, W] tensor works as a list does
    assert high(same_size) == high.caption(list(same_size))
    assert high.caption([]) == []


def test_left_padding_prompts_of_different_lengths(high: MLLMCaptioner) -> None:
    """Rows with prompts of different lengths in one generate call give their single-row texts: the tokenizer
    pads on the left (right padding would put pad tokens between the prompt and the answer)."""
    pixels = _to_uint8_images(_images(1))
    prompts = [high.prompt, LLAVA15_PROMPT_TEMPLATE.format(instruction="Describe it.")]
    inputs = high.processor(images=pixels, text=prompts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and mask[0].all()  # the short prompt is padded on the left
    batched = high._generate(pixels, prompts)
    assert batched == [high._generate([p], [t])[0] for p, t in zip(pixels, prompts, strict=True)]


def test_prompt_string_and_answer_extraction(high: MLLMCaptioner) -> None:
    spy = ProcessorSpy(high.processor)
    captioner = MLLMCaptioner(high.model, spy, HIGHLEVEL_INSTRUCTION_OFFICIAL, max_new_tokens=4)
    captioner.caption(_images())
    assert spy.texts == [[OFFICIAL_HIGHLEVEL_PROMPT] * 2]  # the official string, once per image
    assert HIGHLEVEL_INSTRUCTION_OFFICIAL == HIGHLEVEL_INSTRUCTION_PAPER + "."
    low = captioner.with_instruction(LOWLEVEL_INSTRUCTION_OFFICIAL)
    assert low.model is high.model  # shares the weights
    assert low.prompt == "<image>\nUSER: Describe and evaluate the quality of the image. \nASSISTANT:"
    # The official keeps the text after the last "ASSISTANT:", newlines -> spaces; stripped here.
    assert captioner.answer_marker == "ASSISTANT:"
    assert captioner._answer(" A cat\non a mat.\n") == "A cat on a mat."
    assert captioner._answer("x ASSISTANT: a\nb ") == "a b"
    # max_new_tokens=None: the official max_length=200 counts the prompt with <image> as one token.
    prompt_tokens = len(high.processor.tokenizer(OFFICIAL_HIGHLEVEL_PROMPT)["input_ids"])
    assert (
        high.processor.tokenizer(OFFICIAL_HIGHLEVEL_PROMPT)["input_ids"].count(
            high.model.config.image_token_index
        )
        == 1
    )
    official = MLLMCaptioner(high.model, high.processor, HIGHLEVEL_INSTRUCTION_OFFICIAL)
    assert official.new_token_budget() == OFFICIAL_MAX_LENGTH - prompt_tokens
    assert captioner.new_token_budget() == 4


def test_generation_length(high: MLLMCaptioner) -> None:
    """Greedy, exactly max_new_tokens new tokens (the tiny model cannot end early)."""
    pixels = _to_uint8_images(_images())
    inputs = high.processor(images=pixels, text=[high.prompt] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = high.model.generate(**inputs, do_sample=False, max_new_tokens=high.max_new_tokens)
    assert out.shape[1] - inputs["input_ids"].shape[1] == high.max_new_tokens == 8


def test_missing_model_names_id_and_fix(tmp_path: Path) -> None:
    with pytest.raises(CaptionerNotFoundError) as err:
        MLLMCaptioner.from_pretrained(
            "llava-hf/llava-1.5-7b-hf", HIGHLEVEL_INSTRUCTION_OFFICIAL, local_files_only=True
        )
    msg = str(err.value)
    assert "'llava-hf/llava-1.5-7b-hf'" in msg and "offline" in msg
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf" in msg and "HF_HOME" in msg
    assert "preprocessor_config.json" in msg and "local folder" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(CaptionerNotFoundError, match="nope"):
        MLLMCaptioner.from_pretrained(str(tmp_path / "nope"), "x", local_files_only=True)


def test_from_pretrained_round_trip(tmp_path: Path, high: MLLMCaptioner) -> None:
    """A checkpoint folder in the llava-hf layout (here the tiny model saved) loads through the real path
    (AutoProcessor + LlavaForConditionalGeneration) and captions as the model it was saved from."""
    high.model.save_pretrained(tmp_path)
    high.processor.save_pretrained(tmp_path)
    loaded = MLLMCaptioner.from_pretrained(
        str(tmp_path), HIGHLEVEL_INSTRUCTION_OFFICIAL, max_new_tokens=8, local_files_only=True
    )
    assert loaded.source == str(tmp_path) and next(loaded.model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.model.training
    assert loaded.caption(_images()) == high.caption(_images())
    half = MLLMCaptioner.from_pretrained(str(tmp_path), "x", torch_dtype="bfloat16", local_files_only=True)
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.max_new_tokens is None


@pytest.mark.parametrize("name", ["llava15_7b", "qinstruct", "tiny_llava"])
def test_captioner_configs(name: str) -> None:
    cfg = OmegaConf.load(CONFIG_DIR / "method/captioner" / f"{name}.yaml")
    assert cfg._target_.startswith("restore.models.captioners.")
    if name == "tiny_llava":
        captioner = instantiate(cfg)
        assert isinstance(captioner, MLLMCaptioner) and captioner.prompt == OFFICIAL_HIGHLEVEL_PROMPT
        return
    assert cfg.model_id_or_path == "llava-hf/llava-1.5-7b-hf" and cfg.torch_dtype == "float16"
    expected = HIGHLEVEL_INSTRUCTION_OFFICIAL if name == "llava15_7b" else LOWLEVEL_INSTRUCTION_OFFICIAL
    assert cfg.instruction == expected
    with pytest.raises(Exception, match="huggingface-cli download") as err:  # no weights here
        instantiate(cfg, local_files_only=True)
    assert isinstance(err.value.__cause__ or err.value, CaptionerNotFoundError)  # Hydra wraps errors


# ---------------------------------------------------------------------------------------------- extraction
def _folder(root: Path) -> dict[str, torch.Tensor]:
    """Nested folders, three sizes, one corrupt file; returns key -> image as read back."""
    g = torch.Generator().manual_seed(0)
    written = {
        "a.png": torch.rand(3, 32, 40, generator=g),
        "sub/b.png": torch.rand(3, 48, 24, generator=g),
        "sub/deeper/c.png": torch.rand(3, 20, 20, generator=g),
        "sub/deeper/d.png": torch.rand(3, 36, 36, generator=g),
    }
    for key, img in written.items():
        write_image(root / key, img)
    (root / "sub/bad.png").write_bytes(b"this is not a png")
    return {key: to_tensor(read_image(root / key)) for key in written}


def test_extract_folder_keys_fields_and_unreadable(tmp_path, high, low, caplog) -> None:
    images = _folder(tmp_path / "in")
    out = tmp_path / "prompts.jsonl"
    hi, lo = Counting(high.caption), Counting(low.caption)
    with caplog.at_level(logging.WARNING):
        report = extract_prompts(
            folder_entries(tmp_path / "in"),
            out,
            {"highlevel": hi, "lowlevel": lo},
            batch_size=2,
            progress=False,
        )
    assert [k for k, _ in report.unreadable] == ["sub/bad.png"] and report.unreadable[0][1]
    assert "sub/bad.png" in caplog.text and report.unreadable[0][1] in caplog.text
    assert report.computed == {"highlevel": 4, "lowlevel": 4} and report.images == 5
    assert hi.calls == [2, 1, 1]  # batches of 2 in sorted key order: [a, b] [bad, c] [d]; bad dropped
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.png", "sub/b.png", "sub/deeper/c.png", "sub/deeper/d.png"]
    for field, captioner in (("highlevel", high), ("lowlevel", low)):
        table = PromptTable(out, key=field)
        assert len(table) == 4
        for key, img in images.items():  # batched extraction == captioning each image alone
            assert table[key] == captioner.caption([img])[0]


def test_resume_after_kill(tmp_path, high, low) -> None:
    _folder(tmp_path / "in")
    entries = folder_entries(tmp_path / "in")
    out = tmp_path / "p.jsonl"

    def killed(images):  # the run dies in its second batch
        if len(hi.calls) > 1:
            raise KeyboardInterrupt
        return high.caption(images)

    hi = Counting(killed)
    with pytest.raises(KeyboardInterrupt):
        extract_prompts(
            entries, out, {"highlevel": hi, "lowlevel": low.caption}, batch_size=2, progress=False
        )
    first = read_side_file(out)
    assert list(first) == ["a.png", "sub/b.png"]  # the finished batch [a, b] was flushed
    # A kill can also leave a path appended twice, a partly done image and half a line.
    with out.open("a") as f:
        f.write(json.dumps({"path": "./sub\\b.png", "highlevel": "kept caption"}) + "\n")  # later line wins
        f.write(json.dumps({"path": "sub/deeper/c.png", "highlevel": "c high"}) + "\n")
        f.write(json.dumps(first["a.png"]) + "\n")
        f.write('{"path": "sub/deeper/d.png", "highl')
    hi, lo = Counting(high.caption), Counting(low.caption)
    report = extract_prompts(entries, out, {"highlevel": hi, "lowlevel": lo}, batch_size=2, progress=False)
    assert report.complete_before == 2  # a, b
    assert hi.images == 1 and lo.images == 2  # c had its high-level text, d nothing (bad.png is unreadable)
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and len({json.loads(line)["path"] for line in lines}) == 4  # compacted
    table = PromptTable(out, key="highlevel")
    assert table["sub/b.png"] == "kept caption" and table["sub/deeper/c.png"] == "c high"  # not overwritten
    assert table["a.png"] == first["a.png"]["highlevel"]
    assert PromptTable(out, key="lowlevel")["sub/b.png"] == first["sub/b.png"]["lowlevel"]  # fields kept
    # Nothing left: a third run reads and rewrites, computes nothing.
    hi = Counting(high.caption)
    report = extract_prompts(entries, out, {"highlevel": hi}, progress=False)
    assert hi.calls == [] and report.complete_before == 4


def test_new_field_fills_only_it_and_overwrite(tmp_path, high) -> None:
    _folder(tmp_path / "in")
    entries = folder_entries(tmp_path / "in")
    out = tmp_path / "p.jsonl"
    extract_prompts(entries, out, {"highlevel": high.caption}, progress=False)
    before = {k: r["highlevel"] for k, r in read_side_file(out).items()}

    hi, other = Counting(high.caption), Counting(lambda imgs: ["other"] * len(imgs))
    report = extract_prompts(entries, out, {"highlevel": hi, "tags": other}, progress=False)
    assert hi.calls == [] and other.images == 4 and report.computed == {"highlevel": 0, "tags": 4}
    assert PromptTable(out, key="tags")["sub/b.png"] == "other"

    # A different source for an existing field changes nothing without --overwrite-field ...
    new = Counting(lambda imgs: ["new"] * len(imgs))
    extract_prompts(entries, out, {"highlevel": new, "tags": other}, progress=False)
    assert new.calls == [] and {k: r["highlevel"] for k, r in read_side_file(out).items()} == before
    # ... and recomputes exactly that field with it.
    other.calls.clear()
    extract_prompts(
        entries, out, {"highlevel": new, "tags": other}, overwrite_fields={"highlevel"}, progress=False
    )
    assert new.images == 4 and other.calls == []
    records = read_side_file(out)
    assert all(r["highlevel"] == "new" and r["tags"] == "other" for r in records.values())
    with pytest.raises(ValueError, match="overwrite_fields"):
        extract_prompts(entries, out, {"tags": other}, overwrite_fields={"highlevel"}, progress=False)


def test_empty_value_is_recomputed_and_bad_line_is_an_error(tmp_path, high) -> None:
    _folder(tmp_path / "in")
    entries = folder_entries(tmp_path / "in")
    out = tmp_path / "p.jsonl"
    out.write_text(
        json.dumps({"path": "a.png", "highlevel": ""}) + "\n"
    )  # official failures leave empty text
    hi = Counting(high.caption)
    extract_prompts(entries, out, {"highlevel": hi}, progress=False)
    assert hi.images == 4 and PromptTable(out, key="highlevel")["a.png"]
    text = "not json\n" + out.read_text()
    out.write_text(text)
    with pytest.raises(ValueError, match=r"p\.jsonl:1: invalid JSON"):
        extract_prompts(entries, out, {"highlevel": hi}, progress=False)
    assert out.read_text() == text  # left alone


def test_dape_tags_match_direct_call(tmp_path) -> None:
    images = _folder(tmp_path / "in")
    out = tmp_path / "p.jsonl"
    sources = build_prompt_sources({"tags": "dape"}, tiny=True)
    extract_prompts(folder_entries(tmp_path / "in"), out, sources, batch_size=8, progress=False)
    dape = load_dape("tiny", seed=0, token_dim=32)
    table = PromptTable(out, key="tags")
    for key, img in images.items():  # as SeeSR's tags(): generate_tags(image_embeds(preprocess(x)))
        direct = dape.generate_tags(dape.image_embeds(dape.preprocess(img[None])))
        assert table[key] == direct[0] and direct[0]
    tagger = dape_tagger(dape)
    same = [img[:, :20, :20] for img in images.values()]
    assert tagger(same) == list(dape.generate_tags(dape.image_embeds(dape.preprocess(torch.stack(same)))))
    with pytest.raises(MissingWeightsError, match="DAPE"):  # the full DAPE without its files
        build_prompt_sources({"tags": "dape"}, ram_checkpoint=tmp_path / "ram.pth")


def test_field_specs() -> None:
    assert parse_field_specs(["highlevel=llava15_7b", " tags = dape "]) == {
        "highlevel": "llava15_7b",
        "tags": "dape",
    }
    defaults = parse_field_specs(["highlevel", "lowlevel", "lowlevel_gt", "tags"])
    assert defaults == {
        "highlevel": "llava15_7b",
        "lowlevel": "qinstruct",
        "lowlevel_gt": "qinstruct",
        "tags": "dape",
    }
    for bad in (["caption"], ["a="], ["path=dape"], ["a=dape", "a=dape_tiny"], []):
        with pytest.raises(ValueError):
            parse_field_specs(bad)
    with pytest.raises(ValueError, match="llava15_7b"):
        build_prompt_sources({"x": "no_such_model"})


def test_script_end_to_end_embedded(tmp_path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never a download attempt
    main = _script().main
    out = tmp_path / "p.jsonl"
    args = [
        "--input-embedded",
        "--out",
        str(out),
        "--field",
        "highlevel=llava15_7b",
        "--field",
        "lowlevel=qinstruct",
    ]
    tiny = ["--tiny", "--no-progress", "--batch-size", "4", "--device", "cpu"]
    assert main([*args, "--field", "tags=dape", *tiny]) == 0
    keys = [f"skimage/{n}.png" for n in EMBEDDED_PHOTO_NAMES]
    records = read_side_file(out)
    assert sorted(records) == sorted(keys)
    for field in ("highlevel", "lowlevel", "tags"):
        table = PromptTable(out, key=field)
        table.require(keys)
        assert all(table[k] for k in keys)
    dataset = EmbeddedPhotos(crop_size=64, prompts=out, prompt_key="highlevel")  # reads as a dataset
    assert dataset.keys == keys
    assert f"{len(keys)} images, 0 already complete" in capsys.readouterr().out
    # A second run (bare field names take their default sources) has nothing to do.
    bare = ["--input-embedded", "--out", str(out), "--field", "highlevel", "--field", "lowlevel"]
    assert main([*bare, *tiny]) == 0
    assert f"{len(keys)} already complete" in capsys.readouterr().out
    assert read_side_file(out) == records
    # The real checkpoint is not here: a clean error naming it and the fix, exit code 1.
    assert main([*args, "--no-progress", "--device", "cpu"]) == 1
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "missing"), "--out", str(out), "--field", "a=dape", *tiny]) == 1


def test_sources_from_configs_share_one_checkpoint(monkeypatch) -> None:
    """llava15_7b and qinstruct name the same checkpoint: it is loaded once, with the script's device / dtype,
    and each field keeps its instruction; another path for one field loads a second model."""
    loads = []

    def fake_from_pretrained(model_id_or_path, instruction, **kwargs):
        loads.append((model_id_or_path, kwargs))
        return tiny_llava(instruction, max_new_tokens=kwargs.get("max_new_tokens") or 8)

    monkeypatch.setattr(MLLMCaptioner, "from_pretrained", staticmethod(fake_from_pretrained))
    fields = {"highlevel": "llava15_7b", "lowlevel": "qinstruct"}
    sources = build_prompt_sources(fields, device="cpu", torch_dtype="float32")
    assert [path for path, _ in loads] == ["llava-hf/llava-1.5-7b-hf"]
    assert loads[0][1]["device"] == "cpu" and loads[0][1]["torch_dtype"] == "float32"
    high, low = sources["highlevel"].__self__, sources["lowlevel"].__self__
    assert low.model is high.model and low.max_new_tokens is None  # the qinstruct config's own budget
    assert (high.instruction, low.instruction) == (
        HIGHLEVEL_INSTRUCTION_OFFICIAL,
        LOWLEVEL_INSTRUCTION_OFFICIAL,
    )
    loads.clear()
    sources = build_prompt_sources(fields, model_paths={"lowlevel": "/models/q"}, max_new_tokens=5)
    assert [path for path, _ in loads] == ["llava-hf/llava-1.5-7b-hf", "/models/q"]
    assert sources["lowlevel"].__self__.max_new_tokens == 5
    with pytest.raises(ValueError, match="not requested"):
        build_prompt_sources(fields, model_paths={"tags": "/x"})
