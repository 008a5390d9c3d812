"""SeeSR and XPSR behave as before the core redesign: same training losses, same restored images, and the
train.py checkpoints written before it still load and resume (fixtures: tests/behaviour_baseline.py)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from behaviour_baseline import (
    BASELINE,
    CASES,
    CHECKPOINT_CASES,
    FIXTURES,
    _Pairs,
    _SeeSRPairs,
    build,
    read_checkpoint_fixture,
    run_case,
)
from torch.utils.data import DataLoader

from restore.methods.checkpoints import load_method_weights

# The recording machine reproduces the fixture bit for bit; another CPU may pick other float kernels.
LOSS_RTOL, IMAGE_ATOL = 1e-5, 2e-5
DIFFUSION_TERM = "term:train/diffusion_loss"


@pytest.fixture(scope="module")
def baseline() -> dict[str, np.ndarray]:
    with np.load(BASELINE) as data:
        return dict(data)


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_restored_image_equal_the_pre_refactor_run(case, baseline, tmp_path) -> None:
    got = run_case(case, tmp_path)
    expected = {k.split("/", 1)[1]: v for k, v in baseline.items() if k.split("/", 1)[0] == case}
    # every term is logged now; before, the diffusion term was logged only next to another term
    if DIFFUSION_TERM not in expected:
        np.testing.assert_allclose(got.pop(DIFFUSION_TERM), got["losses"], rtol=0, atol=0)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if key == "image":
            assert got[key].shape == value.shape
            np.testing.assert_allclose(got[key], value, rtol=0, atol=IMAGE_ATOL, err_msg=case)
        else:
            np.testing.assert_allclose(got[key], value, rtol=LOSS_RTOL, atol=0, err_msg=f"{case} {key}")


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_written_before_the_refactor_loads_and_resumes(case, tmp_path) -> None:
    ckpt = read_checkpoint_fixture(FIXTURES / f"pre_refactor_{case}.ckpt.gz", tmp_path / "old.ckpt")
    config, overrides = CASES[case]
    # eval.py / restore.infer: the strict load of the trainable weights
    module = build(config, overrides, tmp_path / "eval")
    load_method_weights(module, ckpt, config)
    assert all(torch.count_nonzero(v) == 0 for v in module.trainable.state_dict().values())
    # train.py ckpt_path=...: weights, optimizer state, generator state and step counter come back
    resumed = build(config, overrides, tmp_path / "train")
    data = _SeeSRPairs() if config.startswith("seesr") else _Pairs()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(resumed, DataLoader(data, batch_size=2), ckpt_path=ckpt)
    assert trainer.global_step == 3  # two steps in the file, one more here
