"""RAM tagger (restore.models.ram): official key layout and sizes, numerics against independent
implementations (timm's Swin with its official-checkpoint filter, transformers' BERT layer), preprocessing,
tag thresholding, checkpoint loading and missing-file errors. Full size only on the meta device.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from restore.models.ram import RAM_VARIANTS, MissingModelFileError, RAMConfig, build_ram, load_ram_checkpoint
from restore.models.ram.ram import RAM, read_tag_list, read_thresholds, resolve_model_file
from restore.models.ram.swin import SwinTransformer
from restore.models.ram.tagging_head import TaggingHead
from restore.weights.manifest import get as manifest_entry

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# Swin-L 384 features (= timm swin_large_patch4_window12_384 without its head: 196,735,516 - 1,537,000).
SWIN_L_PARAMS = 195_198_516


def _tagging_head_params(hidden: int = 768, enc: int = 512, ffn: int = 3072, layers: int = 2) -> int:
    cross = (hidden * hidden + hidden) + 2 * (enc * hidden + hidden) + (hidden * hidden + hidden) + 2 * hidden
    feed = (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * hidden
    return layers * (cross + feed)


@pytest.fixture(scope="module")
def full_meta() -> RAM:
    return build_ram("swin_l_384", tag_list=[f"t{i}" for i in range(4585)], device="meta")


def test_full_size_structure_and_counts(full_meta: RAM) -> None:
    m = full_meta
    assert (m.image_size, m.token_dim, m.num_classes, m.num_tokens) == (384, 512, 4585, 145)
    assert sum(p.numel() for p in m.visual_encoder.parameters()) == SWIN_L_PARAMS
    assert sum(p.numel() for p in m.tagging_head.parameters()) == _tagging_head_params() == 13_389_312
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # 4 patch-embed + 24 blocks x 13 + 3 patch mergings x 3 + 2 norm; 2 x 16 head; 7 projections/embeddings
    assert len(shapes) == 327 + 32 + 7
    expected = {
        "visual_encoder.patch_embed.proj.weight": (192, 3, 4, 4),
        "visual_encoder.layers.0.blocks.1.attn.relative_position_bias_table": (529, 6),
        "visual_encoder.layers.2.blocks.17.attn.qkv.weight": (2304, 768),
        "visual_encoder.layers.2.downsample.reduction.weight": (1536, 3072),
        "visual_encoder.layers.2.downsample.norm.weight": (3072,),
        "visual_encoder.layers.3.blocks.1.mlp.fc2.weight": (1536, 6144),
        "visual_encoder.norm.weight": (1536,),
        "image_proj.weight": (512, 1536),
        "label_embed": (4585, 512),
        "wordvec_proj.weight": (768, 512),
        "fc.weight": (1, 768),
        "tagging_head.encoder.layer.1.crossattention.self.key.weight": (768, 512),
        "tagging_head.encoder.layer.1.crossattention.self.value.weight": (768, 512),
        "tagging_head.encoder.layer.0.crossattention.output.LayerNorm.weight": (768,),
        "tagging_head.encoder.layer.0.intermediate.dense.weight": (3072, 768),
        "tagging_head.encoder.layer.0.output.dense.weight": (768, 3072),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert not any(k.startswith("visual_encoder.layers.3.downsample") for k in shapes)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in shapes)  # derived buffers
    head = {k.split("layer.0.", 1)[1] for k in shapes if k.startswith("tagging_head.encoder.layer.0.")}
    assert head == {
        f"{mod}.{p}"
        for mod in (
            "crossattention.self.query",
            "crossattention.self.key",
            "crossattention.self.value",
            "crossattention.output.dense",
            "crossattention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
        for p in ("weight", "bias")
    }


def test_full_size_token_shapes_on_meta(full_meta: RAM) -> None:
    x = torch.empty(2, 3, 384, 384, device="meta")
    assert full_meta.visual_encoder(x).shape == (2, 145, 1536)
    embeds = full_meta.image_embeds(x)
    assert embeds.shape == (2, 145, 512)
    assert full_meta.tag_logits(embeds).shape == (2, 4585)


def test_swin_keys_are_the_official_ones_and_equal_timm(full_meta: RAM) -> None:
    """timm converts *official* Swin checkpoints with checkpoint_filter_fn: ours load strictly through it and
    give timm's features (a second implementation of the same network)."""
    from timm.models.swin_transformer import SwinTransformer as TimmSwin
    from timm.models.swin_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        ref = TimmSwin(384, 4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12)
        ref.reset_classifier(0)
    converted = checkpoint_filter_fn(full_meta.visual_encoder.state_dict(), ref)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref.state_dict().items()}

    torch.manual_seed(0)
    ours = SwinTransformer(64, 4, 16, (2, 2, 2, 2), (1, 2, 4, 8), 4, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = TimmSwin(64, 4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4).eval()
    ref.reset_classifier(0)
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, grid = ours(x), ref.forward_features(x).flatten(1, 2)
    assert tokens.shape == (2, 5, 128)
    torch.testing.assert_close(tokens[:, 1:], grid, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 0], grid.mean(1), atol=1e-5, rtol=1e-5)


def test_tagging_layer_equals_bert_cross_attention_and_ffn() -> None:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(
        hidden_size=48,
        num_attention_heads=2,
        intermediate_size=96,
        add_cross_attention=True,
        is_decoder=True,
        layer_norm_eps=1e-12,
    )
    cfg._attn_implementation = "eager"
    bert = BertLayer(cfg).eval()
    head = TaggingHead(
        hidden_size=48, encoder_width=48, num_heads=2, num_layers=1, intermediate_size=96
    ).eval()
    result = bert.load_state_dict(head.encoder.layer[0].state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("attention.") for k in result.missing_keys)
    queries, tokens = torch.randn(2, 7, 48), torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = bert.feed_forward_chunk(bert.crossattention(queries, encoder_hidden_states=tokens)[0])
        torch.testing.assert_close(head(queries, tokens), expected, atol=1e-5, rtol=1e-5)


def test_preprocess_is_bicubic_clamp_imagenet() -> None:
    ram = build_ram("tiny")
    images = torch.rand(2, 3, 50, 90) * 1.2 - 0.1
    resized = F.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(ram.preprocess(images), (resized - mean) / std)
    same = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(ram.preprocess(same), (same - mean) / std)  # no resampling at image_size


def test_tiny_forward_shapes_speed_and_reproducibility() -> None:
    ram = build_ram("tiny", token_dim=32)
    assert (ram.image_size, ram.token_dim, ram.num_classes) == (64, 32, 64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        embeds = ram.image_embeds(ram.preprocess(x))
        logits = ram.tag_logits(embeds)
        tags = ram.generate_tags(embeds)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            ram.tag_logits(ram.image_embeds(ram.preprocess(x)))
            times.append(time.perf_counter() - start)
    assert embeds.shape == (2, 5, 32) and logits.shape == (2, 64) and embeds.dtype == torch.float32
    assert min(times) < 0.1, times
    assert len(tags) == 2 and all(isinstance(t, str) for t in tags)
    assert 0 < len(tags[0].split(", ")) < 64  # class-dependent logits: some tags, not all
    again = build_ram("tiny", token_dim=32)
    assert all(torch.equal(a, b) for a, b in zip(ram.state_dict().values(), again.state_dict().values()))
    other = build_ram("tiny", token_dim=32, seed=1)
    assert not torch.equal(ram.label_embed, other.label_embed)


def test_tags_use_per_class_thresholds_and_deleted_indices() -> None:
    names = ["cat", "dog", "sky", "tree", "car"]
    thresholds = [0.5, 0.9, 0.65, 0.65, 0.2]
    config = RAM_VARIANTS["tiny"]
    ram = RAM(config, names, thresholds, delete_tag_index=[3])
    probs = torch.tensor([[0.6, 0.85, 0.66, 0.99, 0.1], [0.5, 0.95, 0.2, 0.7, 0.21]])
    logits = torch.logit(probs)
    assert ram.tags_from_logits(logits) == ["cat, sky", "dog, car"]  # strict ">", class order, ", "
    plain = RAM(config, names)  # no file: config.threshold (0.5 for tiny) everywhere, nothing deleted
    assert plain.tags_from_logits(logits) == ["cat, dog, sky, tree", "dog, tree"]
    with pytest.raises(ValueError, match="3 thresholds for 5 tags"):
        RAM(config, names, [0.5, 0.5, 0.5])
    assert RAMConfig().threshold == 0.68 and RAMConfig().delete_tag_index == ()  # official defaults


def _fake_official_checkpoint(ram: RAM) -> dict:
    """What ram_swin_large_14m.pth looks like: {'model': ...} with the tagging path, the Tag2Text parts,
    the derived buffers and (old checkpoints) the head named vision_multi."""
    state = {k.replace("tagging_head", "vision_multi", 1): v.clone() for k, v in ram.state_dict().items()}
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = torch.zeros(4, 4)
    state["text_decoder.cls.predictions.bias"] = torch.zeros(4)
    state["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)
    state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16)
    state["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    return {"model": state, "epoch": 3}


def test_checkpoint_loading_reports_and_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = build_ram("tiny", seed=3)
    path = tmp_path / "ram_tiny.pth"
    torch.save(_fake_official_checkpoint(source), path)
    with caplog.at_level("INFO", logger="restore.models.ram.ram"):
        target = build_ram("tiny", seed=4, checkpoint=path)
    assert (
        "ignored 3 checkpoint entries off the tagging path (tag_encoder: 1, text_decoder: 2)" in caplog.text
    )
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(target.preprocess(x)), source(source.preprocess(x)))

    report = load_ram_checkpoint(build_ram("tiny"), _fake_official_checkpoint(source))
    assert report.ignored == {"tag_encoder": 1, "text_decoder": 2} and report.derived == 2
    assert report.loaded == len(source.state_dict()) and report.resized == []

    partial = _fake_official_checkpoint(source)
    del partial["model"]["image_proj.weight"]
    with pytest.raises(KeyError, match="lacks 1 tagging-path tensors.*DAPE.pth holds only LoRA"):
        load_ram_checkpoint(build_ram("tiny"), partial)
    with pytest.raises(ValueError, match="label_embed rows = number of classes"):
        load_ram_checkpoint(build_ram("tiny", tag_list=["a", "b"]), _fake_official_checkpoint(source))


def test_relative_position_tables_are_resized_to_the_window() -> None:
    small_window = build_ram("tiny", window_size=2)  # stage-1 tables 3x3 instead of 7x7
    report = load_ram_checkpoint(build_ram("tiny"), {"model": small_window.state_dict()})
    assert "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table" in report.resized
    assert (
        "visual_encoder.layers.3.blocks.0.attn.relative_position_bias_table" not in report.resized
    )  # 2x2 map


def test_files_readers_and_missing_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tags = tmp_path / "tags.txt"
    tags.write_text("cat\ndog\nsky", encoding="utf-8")  # the official file has no final newline
    thresholds = tmp_path / "thr.txt"
    thresholds.write_text("0.65\n0.8\n0.9\n", encoding="utf-8")
    assert read_tag_list(tags) == ["cat", "dog", "sky"] and read_thresholds(thresholds) == [0.65, 0.8, 0.9]
    ram = build_ram("tiny", tag_list=tags, thresholds=thresholds)
    assert ram.tag_list == ["cat", "dog", "sky"] and ram.class_threshold.tolist() == pytest.approx(
        [0.65, 0.8, 0.9]
    )

    for name in ("ram_swin_large_14m.pth", "ram_tag_list.txt", "ram_tag_list_threshold.txt"):
        entry = manifest_entry(name)
        with pytest.raises(MissingModelFileError) as info:
            resolve_model_file(tmp_path / "weights" / name, "RAM")
        message = str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert (
            name in message and entry.url in message and f"python -m restore.weights fetch {name}" in message
        )
    with pytest.raises(FileNotFoundError, match="ram_swin_large_14m.pth"):
        build_ram("tiny", checkpoint=tmp_path / "ram_swin_large_14m.pth")

    # a file installed where `python -m restore.weights fetch` puts it is found from the bare name or a
    # stale path with the same file name
    installed = manifest_entry("ram_tag_list.txt").path
    installed.parent.mkdir(parents=True)
    installed.write_text("a\nb", encoding="utf-8")
    assert resolve_model_file("ram_tag_list.txt", "RAM") == installed
    assert resolve_model_file(tmp_path / "elsewhere" / "ram_tag_list.txt", "RAM") == installed
