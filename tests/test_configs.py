"""Every config composes and instantiates (Hydra compose API, globbed over the files, nothing hard-coded).

Real-data configs are instantiated against a fake ``paths.data_root`` that has the documented layout
(data/README.md): image listing only checks names, so most files can be empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from hydra_helpers import compose_config, options
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from restore import CONFIG_DIR
from restore.data.hr_datasets import EMBEDDED_PHOTO_NAMES
from restore.data.image_io import write_image
from restore.evaluation.benchmark import Benchmark
from restore.models.priors import PriorNotFoundError
from restore.run import ConfigError, instantiate_callbacks, instantiate_loggers
from restore.weights.manifest import MissingWeightsError

GROUPS = [
    "data",
    "method/prior",
    "experiment",
    "trainer",
    "logger",
    "callbacks",
    "benchmark",
    "debug",
    "degradation",
    "method",
    "metrics",
    "protocol",
]


@pytest.fixture(scope="module")
def fake_data_root(tmp_path_factory) -> Path:
    """The folder layout of data/README.md with a real image where one is read and empty files elsewhere."""
    root = tmp_path_factory.mktemp("data")
    img = torch.rand(3, 512, 512)  # >= every configured crop: no padding warnings
    for rel in (
        "DIV2K/DIV2K_train_HR/0001.png",
        "Flickr2K/Flickr2K_HR/000001.png",
        "OST/animal/animal_0001.png",
        "COCO/train2017/000000000009.png",  # real COCO files are JPEGs; any image works
    ):
        write_image(root / rel, img)
    write_image(root / "LSDIR/HR/train/0001000/0000001.png", img)
    (root / "LSDIR/train.json").write_text('[{"path": "HR/train/0001000/0000001.png"}]')
    faces = root / "FFHQ/images1024x1024"
    face = write_image(root / "face.png", torch.rand(3, 32, 32)).read_bytes()  # small: 10,000 copies
    for folder in range(10):  # 10,000 faces in 1,000-file folders, like the real download
        (faces / f"{folder:02d}000").mkdir(parents=True)
        for i in range(1000):
            (faces / f"{folder:02d}000" / f"{folder * 1000 + i:05d}.png").write_bytes(face)
    for split, size in (("lq", 16), ("gt", 64)):
        write_image(root / "benchmarks/samples" / split / "0001.png", torch.rand(3, size, size))
    for split, size in (("lq", 128), ("gt", 512)):  # data=paired_train (experiment=xpsr)
        write_image(root / "train_pairs" / split / "0001.png", torch.rand(3, size, size))
    precomputed = root / "train_pairs/precomputed"  # data=precomputed reads only the manifest at build time
    precomputed.mkdir()
    (precomputed / "manifest.json").write_text(
        json.dumps(
            {
                "format": "restore.precomputed_inputs/v1",
                "complete": True,
                "variants": ["plain", "hflip"],
                "samples_per_shard": 1,
                "num_samples": 1,
                "gt_size": [512, 512],
                "encoder": {},
                "pair_set": {},
            }
        )
    )
    for split, size in (
        ("sr_bicubic", 1024),
        ("gt", 1024),
    ):  # experiment=dreamclear: 1024² pairs with captions
        write_image(root / "dreamclear_pairs" / split / "0001.png", torch.rand(3, size, size))
    (root / "dreamclear_pairs/prompts.jsonl").write_text(
        json.dumps({"path": "0001.png", "caption": "a cat"}) + "\n"
    )
    xpsr_prompts = {"highlevel": "a photo", "lowlevel": "blurry", "lowlevel_gt": "sharp"}
    (root / "train_pairs/prompts.jsonl").write_text(json.dumps({"path": "0001.png", **xpsr_prompts}) + "\n")
    write_image(root / "DIV8K/0001.png", img)  # experiment=stablesr
    cfw = root / "cfw_pairs"  # experiment=stablesr_cfw: stage-1 latents with the upsampled LR and the GT
    for folder in ("inputs", "gts"):
        write_image(cfw / folder / "0001.png", torch.rand(3, 64, 64))
    (cfw / "latents").mkdir()
    np.save(cfw / "latents/0001.npy", np.zeros((1, 4, 8, 8), np.float32))
    # experiment=supir: captions of the photos and the faces, images generated from the negative prompt
    (root / "LSDIR/captions.jsonl").write_text(
        json.dumps({"path": "HR/train/0001000/0000001.png", "caption": "a cat"}) + "\n"
    )
    (root / "FFHQ/captions.jsonl").write_text(
        json.dumps({"path": "00000/00000.png", "caption": "a face"}) + "\n"
    )
    write_image(root / "supir_negative/0001.png", img)
    (root / "xpsr_tiny").mkdir()  # experiment=xpsr_tiny: prompts of the embedded photos
    (root / "xpsr_tiny/prompts.jsonl").write_text(
        "".join(json.dumps({"path": f"skimage/{n}.png", **xpsr_prompts}) + "\n" for n in EMBEDDED_PHOTO_NAMES)
    )
    return root


def _link_data(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "data").symlink_to(data_root, target_is_directory=True)


# Values for the mandatory `???` entries of generic configs (folder datasets/benchmarks).
FILL = {
    "data.train.root": "DIV2K/DIV2K_train_HR",
    "benchmark.lr_dir": "benchmarks/samples/lq",
}


def _fill_missing(cfg: DictConfig, data_root: Path) -> None:
    for key in sorted(OmegaConf.missing_keys(cfg)):
        assert key in FILL, f"no test value for mandatory config key {key}"
        OmegaConf.update(cfg, key, str(data_root / FILL[key]))


# Models that load released weights (not downloadable here). The full config must fail with the
# missing-weights error that names the fix; the rest of it is checked with the tiny parts swapped in.
#: Methods that are a weights file (released GAN / regression baselines): method.weights=<file>.
CONFIGURED_BY_FILE = ("spandrel",)
NEEDS_WEIGHTS = {
    "seesr": ["method/prior=tiny", "method/tagger@method.dape=dape_tiny"],
    "xpsr": ["method/prior=tiny", "+method.controlnet.conditioning_embedding_out_channels=[8,16,16,16]"],
    "dreamclear": [
        "method/prior=tiny_pixart",
        "method/reference=tiny",
        "method.captioner=null",
    ],
    "stablesr": ["method/prior=tiny"],
    "stablesr_cfw": ["method/prior=tiny"],
    "supir": ["method/prior=tiny_sdxl_supir", "method.captioner=null"],
    "supir_encoder": ["method/prior=tiny_sdxl_supir", "method.captioner=null"],
    "dape": [
        "method.ram.variant=tiny",
        "method.ram.checkpoint=null",
        "method.ram.tag_list=null",
        "method.ram.thresholds=null",
    ],
}


# experiment=dreamclear reads precomputed T5 features, settings the tiny prior has no place for
EXPERIMENT_EXTRA = {
    "dreamclear": ["~method.prior.load_text_encoder", "~method.prior.text_features"],
    "supir": ["~method.prior.load_text_encoder"],
    "supir_encoder": ["~method.prior.load_text_encoder"],
}
# Data configs that read a method's settings (data=supir: the negative prompt of its negative-quality samples).
DATA_METHOD = {"supir": "supir_tiny"}


def _model_overrides(model: str) -> list[str]:
    return NEEDS_WEIGHTS.get(model, [])


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes_and_instantiates(experiment: str, tmp_path: Path, fake_data_root: Path) -> None:
    _link_data(tmp_path, fake_data_root)
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    if experiment in NEEDS_WEIGHTS:  # every experiment names its own model config
        extra = [*_model_overrides(experiment), *EXPERIMENT_EXTRA.get(experiment, [])]
        cfg = compose_config("train", [f"experiment={experiment}", *extra], tmp_path)
    assert cfg.task_name == experiment
    assert not OmegaConf.missing_keys(cfg), "experiments must be runnable without further values"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves

    datamodule = instantiate(cfg.data)
    assert len(datamodule.train_set) > 0
    item = datamodule.train_set[0]
    image = item["hq"] if "hq" in item else item["gt"]  # HR-only data, or pairs degraded offline
    assert image.shape[0] == 3 and image.shape[1] == image.shape[2]
    if cfg.get("degradation") is None:
        model_scale = getattr(instantiate(cfg.method), "scale", 1)  # StableSR's CFW stage: no scale
        data_scale = cfg.data.train.get("scale", model_scale)
        assert item["lq"].shape[-1] * data_scale == image.shape[-1]
        # 1: the LR stored already upsampled to the GT size (DreamClear's sr_bicubic), which the method reads
        assert data_scale in (model_scale, 1)
        return
    degradation = instantiate(cfg.degradation)
    model = instantiate(cfg.method, degradation=degradation)
    assert model.scale == degradation.config.scale
    assert instantiate_callbacks(cfg.callbacks)
    assert all(isinstance(lg, Logger) for lg in instantiate_loggers(cfg.logger, cfg.paths.output_dir))
    assert issubclass(get_class(cfg.trainer._target_), object)


@pytest.mark.parametrize("data", options("data"))
def test_data_config_instantiates(data: str, tmp_path: Path, fake_data_root: Path) -> None:
    _link_data(tmp_path, fake_data_root)
    cfg = compose_config(
        "train", [f"data={data}", f"method={DATA_METHOD.get(data, 'realesrnet_tiny')}"], tmp_path
    )
    _fill_missing(cfg, fake_data_root)
    datamodule = instantiate(cfg.data)
    assert len(datamodule.train_set) > 0


def test_ffhq_keeps_the_first_10k_faces(tmp_path: Path, fake_data_root: Path) -> None:
    _link_data(tmp_path, fake_data_root)
    cfg = compose_config("train", ["data=ffhq"], tmp_path)
    train_set = instantiate(cfg.data).train_set
    assert len(train_set) == 10_000
    assert train_set.keys[0] == "00000/00000.png" and train_set.keys[-1] == "09000/09999.png"


@pytest.mark.parametrize("benchmark", options("benchmark"))
def test_benchmark_config_builds(benchmark: str, tmp_path: Path, fake_data_root: Path) -> None:
    _link_data(tmp_path, fake_data_root)
    cfg = compose_config("eval", [f"benchmark={benchmark}", "method=bicubic"], tmp_path)
    _fill_missing(cfg, fake_data_root)
    bench = Benchmark.from_config(OmegaConf.to_container(cfg.benchmark, resolve=True))
    assert bench.name == benchmark and bench.scale == 4 and bench.crop_border == 0
    assert bench.lr_dir.is_relative_to(tmp_path / "data") or bench.lr_dir.is_relative_to(fake_data_root)
    unknown = [m for m in bench.metrics if m not in cfg.metrics]
    assert not unknown, (
        f"benchmark {benchmark} lists metrics missing from configs/metrics/default.yaml: {unknown}"
    )
    assert bench.has_reference == (benchmark not in ("reallr200", "folder"))  # folder: gt_dir optional
    if benchmark in ("samples", "folder"):  # their folders exist in the fake data root
        items, skipped = bench.collect()
        assert [it.name for it in items] == ["0001"] and not skipped
    assert instantiate(cfg.method).scale == cfg.benchmark.scale


@pytest.mark.parametrize("model", options("method"))
def test_model_config_instantiates(model: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"method={model}"], tmp_path)
    if model in CONFIGURED_BY_FILE:  # no default: the weights file is the choice (method.weights=<file>)
        with pytest.raises(Exception, match="Missing mandatory value: method.weights"):
            instantiate(cfg.method)
        from restore.models.reference import tiny_reference

        torch.save({"params_ema": tiny_reference().model.state_dict()}, tmp_path / "net.pth")
        cfg = compose_config("train", [f"method={model}", f"method.weights={tmp_path / 'net.pth'}"], tmp_path)
    if model in NEEDS_WEIGHTS:
        with pytest.raises(Exception, match="fetch|download") as err:
            instantiate(cfg.method)
        cause = err.value if err.value.__cause__ is None else err.value.__cause__  # Hydra wraps errors
        assert isinstance(cause, (PriorNotFoundError, MissingWeightsError)), repr(err.value)
        cfg = compose_config("train", [f"method={model}", *_model_overrides(model)], tmp_path)
    method = instantiate(cfg.method)
    x = torch.rand(1, 3, 12, 12)
    if (model.endswith("_tiny") or model in ("bicubic", *CONFIGURED_BY_FILE)) and hasattr(method, "restore"):
        assert method.restore(x).shape == (1, 3, 48, 48)
    if "optimizer" in cfg.method:  # trainable methods (bicubic is not)
        method.hparams.scale_lr = (
            False  # scaling by the global batch needs a Trainer (tests/test_latent_diffusion)
        )
        optimizers = method.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers[0]
        assert optimizer.param_groups[0]["lr"] == cfg.method.optimizer.lr


def test_realesrnet_matches_the_official_x4plus_recipe(tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=realesrnet"], tmp_path)
    net = cfg.method.net
    assert (net.num_feat, net.num_block, net.num_grow_ch, net.scale) == (64, 23, 32, 4)
    assert cfg.method.optimizer.lr == 2e-4 and list(cfg.method.optimizer.betas) == [0.9, 0.99]
    assert cfg.data.batch_size == 12 and cfg.trainer.devices == 4 and cfg.trainer.max_steps == 1_000_000
    assert cfg.data.train.datasets[0].crop_size == 256


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_config(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        get_class(cfg.trainer._target_)  # cannot build a GPU trainer here; the target still resolves
        if isinstance(cfg.trainer.get("strategy"), DictConfig):
            get_class(cfg.trainer.strategy._target_)
        return
    built = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert built.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("debug", [d for d in options("debug") if d != "default"])
def test_debug_presetscompose_config(debug: str, tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=realesrnet_tiny", f"debug={debug}"], tmp_path)
    assert cfg.task_name == "debug" and cfg.logger is None and cfg.data.num_workers == 0
    instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_and_null_entries(callbacks: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"callbacks={callbacks}"], tmp_path)
    built = instantiate_callbacks(cfg.callbacks)
    assert all(isinstance(cb, Callback) for cb in built)
    if callbacks == "default":
        off = compose_config("train", ["callbacks.model_checkpoint=null"], tmp_path)
        assert len(instantiate_callbacks(off.callbacks)) == len(built) - 1


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs(logger: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"logger={logger}"], tmp_path)
    built = instantiate_loggers(cfg.logger, cfg.paths.output_dir)
    assert all(isinstance(lg, Logger) for lg in built)
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True
        again = instantiate_loggers(cfg.logger, cfg.paths.output_dir)
        assert built[0]._wandb_init["id"] == again[0]._wandb_init["id"]  # same run dir -> same wandb run


def test_entry_without_target_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config("train", ["+callbacks.broken.foo=1"], tmp_path)
    with pytest.raises(ConfigError, match=r"callbacks\.broken.*_target_"):
        instantiate_callbacks(cfg.callbacks)


def test_paths_and_run_dirs(tmp_path: Path) -> None:
    cfg = compose_config("train", ["task_name=mytask"], tmp_path, hydra_cfg=True)
    assert cfg.hydra.run.dir == str(tmp_path / "run")  # our override; the default pattern is below
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose(config_name="train", return_hydra_config=True)
    assert OmegaConf.to_container(raw.hydra.run)["dir"].startswith("${paths.log_dir}/${task_name}/runs/")
    sweep = OmegaConf.to_container(raw.hydra.sweep)
    assert (
        sweep["dir"].startswith("${paths.log_dir}/${task_name}/multiruns/")
        and sweep["subdir"] == "${hydra.job.num}"
    )
    assert OmegaConf.to_container(raw.paths)["output_dir"] == "${hydra:runtime.output_dir}"


def test_slurm_launcher_config(tmp_path: Path) -> None:
    cfg = compose_config(
        "train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8"], tmp_path, hydra_cfg=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8 and launcher.nodes == 1
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0
    assert list(launcher.setup) == []  # the job's environment is set when it starts: restore/cluster.py
    local = compose_config("train", ["hydra/launcher=local"], tmp_path, hydra_cfg=True)
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


@pytest.mark.parametrize("prior", options("method/prior"))
def test_prior_config_builds_or_names_the_missing_weights(prior: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the real priors are not here
    cfg = OmegaConf.load(CONFIG_DIR / "method" / "prior" / f"{prior}.yaml")
    if prior.startswith("tiny"):
        built = instantiate(cfg)
        assert built.source is None and built.encode_text(["a cat"]).hidden_states.shape[0] == 1
        return
    with pytest.raises(Exception, match="huggingface-cli download " + str(cfg.path_or_hub_id)) as err:
        instantiate(cfg)
    cause = err.value if err.value.__cause__ is None else err.value.__cause__  # Hydra wraps errors
    assert isinstance(cause, PriorNotFoundError), repr(err.value)
