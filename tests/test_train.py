"""The shared training loop: it learns, logs, checkpoints and resumes exactly.

The data here are tiny random ellipsoids and their dipole fields, built in
this test only (training data proper come from qsmprep.sim.hybrid).
"""

import csv
import json

import numpy as np
import pytest
import torch

from qsmprep.dl.nextqsm import NeXtQSM
from qsmprep.qsm.kernels import dipole_convolve
from qsmprep.train.loop import learning_rate, run_fraction, train
from qsmprep.train.tasks import TASKS

SHAPE = (16, 16, 16)
SMALL = {"base": 4, "levels": 2}


def _sample(index):
    rng = np.random.default_rng(index)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    chi = np.zeros(SHAPE, np.float32)
    for _ in range(3):
        c, a = rng.uniform(4, 12, 3), rng.uniform(2, 5, 3)
        chi[(((grid - c) / a) ** 2).sum(-1) <= 1] = rng.uniform(-0.1, 0.2)
    mask = np.zeros(SHAPE, np.float32)
    mask[2:-2, 2:-2, 2:-2] = 1
    local = dipole_convolve(chi * mask, (1, 1, 1))
    return {"chi": chi * mask, "mask": mask, "local_field": local,
            "total_field": local + 0.1 * grid[..., 0].astype(np.float32) / 16,
            "b0_dir": np.array([0, 0, 1], np.float32),
            "voxel_size_mm": np.ones(3, np.float32)}


def _stream(start):
    i = start
    while True:
        yield _sample(i % 4)
        i += 1


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_few_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    _, metrics = train("unet", tmp_path, _stream, [_sample(7)], steps=40, lr=1e-2,
                       config=SMALL, log_every=1, validate_every=40, progress=False)
    rows = _rows(tmp_path / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 40 and [int(r["step"]) for r in rows] == list(range(1, 41))
    # the U-Net starts exactly at its TKD input channel and learns a residual:
    # compare whole cycles of the 4 training samples
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])
    assert np.isfinite(metrics["val_nrmse_chi"])
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "best.pt").exists()


def test_resume_continues_from_the_exact_step(tmp_path):
    kwargs = dict(steps=6, config={"bfr": SMALL, "vn": {**SMALL, "steps": 2}}, log_every=1,
                  validate_every=100, progress=False, seed=3)
    straight, _ = train("nextqsm", tmp_path / "a", _stream, [_sample(9)], **kwargs)
    train("nextqsm", tmp_path / "b", _stream, [_sample(9)], stop_at=3, **kwargs)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    resumed, _ = train("nextqsm", tmp_path / "b", _stream, [_sample(9)],
                       resume=tmp_path / "b" / "checkpoint.pt", **kwargs)
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    a, b = _rows(tmp_path / "a" / "metrics.csv"), _rows(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert np.allclose([float(r["loss"]) for r in a], [float(r["loss"]) for r in b], rtol=1e-5)


def test_learning_rate_schedule():
    assert learning_rate(run_fraction(0, 100), 1e-3) == 1e-3
    assert learning_rate(run_fraction(100, 100), 1e-3) == 5e-5
    assert learning_rate(run_fraction(50, 100), 1e-3) < learning_rate(run_fraction(25, 100), 1e-3)
    # warm-up: linear from lr / n over the first n steps, then the cosine schedule
    assert learning_rate(run_fraction(0, 100), 1e-3, 0, 10) == pytest.approx(1e-4)
    assert learning_rate(run_fraction(4, 100), 1e-3, 4, 10) == pytest.approx(
        0.5 * learning_rate(run_fraction(4, 100), 1e-3))
    assert learning_rate(run_fraction(10, 100), 1e-3, 10, 10) == learning_rate(
        run_fraction(10, 100), 1e-3)
    # a time budget ends the schedule when it runs out before the steps do
    assert run_fraction(10, 100, wall_s=30.0, time_budget_s=60.0) == 0.5
    assert run_fraction(80, 100, wall_s=30.0, time_budget_s=60.0) == 0.8
    assert run_fraction(10, 100, wall_s=90.0, time_budget_s=60.0) == 1.0


def test_a_time_budget_ends_the_run_validated_and_the_card_says_so(tmp_path):
    from qsmprep.train.export import export

    budget = 1.5
    train("unet", tmp_path / "run", _stream, [_sample(7)], steps=100000, config=SMALL,
          log_every=1, validate_every=100000, progress=False, time_budget_s=budget,
          data_options={"patch_size": 40}, warmup_steps=2)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert 0 < state["step"] < 100000 and budget <= state["wall_s"] < budget + 1.0
    rows = _rows(tmp_path / "run" / "metrics.csv")
    # the last step is validated (best.pt exists) and ran at the decayed rate
    assert rows[-1]["val_nrmse_chi"] and (tmp_path / "run" / "best.pt").exists()
    assert float(rows[0]["lr"]) < float(rows[1]["lr"])  # warming up
    # the rate follows the time spent, not the steps (0.1 % of 100000 here): the last
    # step's is the cosine at the fraction of the budget used before it (its row's
    # wall_s is rounded to 0.1 s), well below the peak (the last step starts late in the
    # budget; how late depends on the machine's load, so that is not asserted)
    used = float(rows[-2]["wall_s"]) / budget
    ratio = float(rows[-1]["lr"]) / float(rows[1]["lr"])
    assert ratio < 0.8 and abs(ratio - learning_rate(used, 1.0)) < 0.12
    # the card reports the run as sized by time and retrains it the same way
    # (export scores 40^3 validation patches, as the run recorded)
    export("unet", tmp_path / "run", tmp_path / "models")
    card = (tmp_path / "models" / "unet.md").read_text()
    assert f"a run of 2 s of training steps ({state['step']} steps)" in card
    assert "--patch 40 --time-budget 2" in card and '"patch_size": 40' in card
    assert "--validate-every 100000" in card  # the run's validation interval, not the default
    assert "--warmup 2" in card and "linear warm-up over 2 steps" in card
    # and rebuilds its architecture: the config entries that differ from the defaults
    assert f"--config '{json.dumps(SMALL)}'" in card


def test_config_overrides_are_what_differs_from_the_model_defaults():
    from qsmprep.dl.unet import UNetQSM
    from qsmprep.train.export import config_overrides

    task = TASKS["unet"]
    assert config_overrides(task, UNetQSM().config) == {}
    tv = {"lam": 2e-4, "max_iter": 40, "tol": 3e-3}
    assert config_overrides(task, UNetQSM({"init_tv": tv, "base": 8}).config) == {
        "init_tv": tv, "base": 8}
    assert config_overrides(TASKS["nextqsm"], NeXtQSM().config) == {}


def test_init_from_shipped_weights_and_clear_error_on_a_foreign_file(tmp_path):
    from qsmprep.dl.unet import UNetQSM
    from qsmprep.dl.weights import load_weights, save_weights

    trained, _ = train("unet", tmp_path / "a", _stream, [_sample(7)], steps=3, config=SMALL,
                       validate_every=100, progress=False)
    save_weights("unet", trained, models_dir=tmp_path / "models")
    shipped = load_weights("unet", tmp_path / "models")["state_dict"]
    # zero steps: the model is exactly the (float16-rounded) shipped weights
    started, _ = train("unet", tmp_path / "b", _stream, [_sample(7)], steps=0, config=SMALL,
                       init=tmp_path / "models" / "unet.pt", progress=False)
    for key, value in shipped.items():
        assert torch.equal(started.state_dict()[key].float(), value), key
    # without a config the fine-tune builds the architecture of --init (here
    # SMALL with a TV channel), and a config updates it
    tv = {"lam": 2e-4, "max_iter": 5, "tol": 1e-3}
    save_weights("unet", UNetQSM({**SMALL, "init_tv": tv}), models_dir=tmp_path / "tv")
    tuned, _ = train("unet", tmp_path / "d", _stream, [_sample(7)], steps=0,
                     init=tmp_path / "tv" / "unet.pt", progress=False)
    assert tuned.config == UNetQSM({**SMALL, "init_tv": tv}).config
    tuned, _ = train("unet", tmp_path / "e", _stream, [_sample(7)], steps=0,
                     config={"init_tv": None}, init=tmp_path / "tv" / "unet.pt", progress=False)
    assert tuned.config["init_tv"] is None and tuned.config["base"] == SMALL["base"]
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no weights of a unet model"):
        train("unet", tmp_path / "c", _stream, [_sample(7)], steps=0, config=SMALL,
              init=tmp_path / "foreign.pt", progress=False)


def test_export_ships_weights_card_and_tkd_baseline(tmp_path):
    from qsmprep.dl.weights import load_weights, read_manifest
    from qsmprep.train.export import check_nrmse, export

    train("unet", tmp_path / "run", _stream, [_sample(7)], steps=2, config=SMALL,
          validate_every=1, progress=False)
    models = tmp_path / "models"
    val, check = export("unet", tmp_path / "run", models)
    assert set(read_manifest(models)) == {"unet.pt", "unet.md", "check_case.npz"}
    card = (models / "unet.md").read_text()
    blob = load_weights("unet", models)
    whole = blob["meta"]["whole_head_nrmse"]["val_nrmse_chi"]
    assert (f"| chi | {val['val_nrmse_chi']:.2f} | {whole:.2f} | "
            f"{check['val_nrmse_chi']:.2f} |") in card
    # two steps from a zero-initialised residual head: still close to its TKD input
    tkd_row = next(line for line in card.splitlines() if line.startswith("| chi: TKD input"))
    tkd_val = float(tkd_row.split("|")[2])
    assert abs(tkd_val - val["val_nrmse_chi"]) < 10
    from qsmprep.dl.unet import UNetQSM

    shipped = UNetQSM(load_weights("unet", models)["config"])
    shipped.load_state_dict(load_weights("unet", models)["state_dict"])
    assert check_nrmse("unet", shipped, models)["val_nrmse_chi"] == pytest.approx(
        check["val_nrmse_chi"], abs=1e-3)


def test_whole_head_validation_selects_best_and_extends_a_resumed_log(tmp_path):
    whole = [_sample(11), _sample(12)]
    kwargs = dict(steps=4, config=SMALL, log_every=1, validate_every=2, progress=False)
    train("unet", tmp_path, _stream, [_sample(7)], stop_at=2, **kwargs)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["selected_on"] == "patches"
    # a log from an older version (no whole-head columns) holding a step logged
    # after the checkpoint: the resumed run extends the header, drops the row
    rows = _rows(tmp_path / "metrics.csv")
    with open(tmp_path / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "wall_s", "lr", "loss",
                                                "val_nrmse_chi"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + [{**rows[-1], "step": "3"}])
    train("unet", tmp_path, _stream, [_sample(7)], resume=tmp_path / "checkpoint.pt",
          whole_samples=whole, **kwargs)
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[1]["val_whole_nrmse_chi"] == "" and float(rows[3]["val_whole_nrmse_chi"]) > 0
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["selected_on"] == "whole" and best["step"] == 4
    assert best["best"] == pytest.approx(float(rows[3]["val_whole_nrmse_chi"]))


needs_bf16 = pytest.mark.skipif(not __import__("qsmprep.dl.inference", fromlist=["x"])
                                .bf16_supported("cpu"),
                                reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")


def test_precision_choice():
    from qsmprep.dl.inference import bf16_supported, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if bf16_supported("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("task", ["nextqsm", "ir2qsm"])
def test_bf16_gradients_follow_the_float32_ones(task, device):
    """Mixed precision changes the rounding of a step, not its direction
    (NeXtQSM: the FFT dipole data term must stay float32 under autocast)."""
    from qsmprep.dl.inference import autocast, bf16_supported
    from qsmprep.train.loop import to_batch
    from qsmprep.train.tasks import TASKS

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not bf16_supported(device):
        pytest.skip(f"no native bfloat16 on {device}")

    config = ({"bfr": SMALL, "vn": {**SMALL, "steps": 2}} if task == "nextqsm"
              else {**SMALL, "iterations": 2, "aux_weights": [0.5, 1.0]})
    torch.manual_seed(0)
    model = TASKS[task].build(config).to(device, memory_format=torch.channels_last_3d)
    for p in model.parameters():  # leave the zero-initialised residual heads
        p.data += 0.05 * torch.randn_like(p)
    batch = to_batch([_sample(1)], device)
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss, _ = TASKS[task].loss(model, batch, 0, 1, np.random.default_rng(0))
        assert loss.dtype == torch.float32
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten().double() for p in model.parameters()
                                      if p.grad is not None])
    a, b = grads["fp32"], grads["bf16"]
    assert float(a @ b / (a.norm() * b.norm())) > 0.99
    assert 0.8 < float(b.norm() / a.norm()) < 1.25


@needs_bf16
def test_bf16_refuses_patches_too_small_for_its_batch_statistics(tmp_path):
    with pytest.raises(ValueError, match="needs patches of at least 32 voxels a side"):
        train("unet", tmp_path, _stream, [_sample(7)], steps=1, config={"base": 4, "levels": 4},
              progress=False, precision="bf16")
    train("unet", tmp_path, _stream, [_sample(7)], steps=1, config={"base": 4, "levels": 4},
          progress=False, precision="fp32")  # float32 is fine with them


@needs_bf16
def test_bf16_training_learns_and_its_card_says_so(tmp_path):
    from qsmprep.train.export import export

    torch.manual_seed(0)
    model, _ = train("unet", tmp_path / "run", _stream, [_sample(7)], steps=40, lr=1e-2,
                     config=SMALL, log_every=1, validate_every=40, progress=False,
                     precision="auto")
    losses = [float(r["loss"]) for r in _rows(tmp_path / "run" / "metrics.csv")]
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["precision"] == "bf16"
    assert all(v.dtype == torch.float32 and v.is_contiguous()
               for v in state["model"].values() if v.is_floating_point())
    export("unet", tmp_path / "run", tmp_path / "models")
    card = (tmp_path / "models" / "unet.md").read_text()
    assert "bfloat16 mixed-precision steps, float32 weights" in card
    assert "--precision bf16 --export" in card


def test_prior_nrmse_is_the_untrained_networks_score():
    """The card's closed-form row (V-SHARP for NeXtQSM's background removal,
    TKD for IR2QSM and the U-Net) scores what an untrained network returns."""
    from qsmprep.dl.nextqsm import VSHARP_PRIOR, NeXtQSM
    from qsmprep.train.export import prior_nrmse
    from qsmprep.train.loop import to_batch
    from qsmprep.train.tasks import TASKS, validation_metrics

    batches = [to_batch([_sample(i)], "cpu") for i in (5, 6)]
    torch.manual_seed(0)
    model = NeXtQSM({"bfr": {**SMALL, "vsharp": VSHARP_PRIOR}, "vn": {**SMALL, "steps": 1}})
    untrained = validation_metrics(TASKS["nextqsm-bfr"], model, batches)["val_nrmse_local"]
    assert prior_nrmse("nextqsm", model, batches) == {"local": pytest.approx(untrained, abs=1e-3)}
    assert prior_nrmse("nextqsm", NeXtQSM({"bfr": {**SMALL, "vsharp": None},
                                           "vn": {**SMALL, "steps": 1}}), batches) is None


def test_init_takes_each_module_whole_or_not_at_all(tmp_path):
    """NeXtQSM weights from before the V-SHARP channel: the variational
    network is taken, the background removal (whose input layer changed)
    starts fresh, i.e. exactly at V-SHARP, not from half its old weights."""
    from qsmprep.dl.nextqsm import VSHARP_PRIOR, NeXtQSM

    small = {"bfr": {**SMALL, "vsharp": VSHARP_PRIOR}, "vn": {**SMALL, "steps": 1}}
    torch.manual_seed(1)
    old = NeXtQSM({**small, "bfr": {**SMALL, "vsharp": None}})
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.1)
    torch.save({"model": old.state_dict()}, tmp_path / "old.pt")
    new, _ = train("nextqsm-bfr", tmp_path / "run", _stream, [_sample(7)], steps=0, config=small,
                   init=tmp_path / "old.pt", progress=False)
    for key, value in old.state_dict().items():
        if not key.startswith("bfr."):
            assert torch.equal(new.state_dict()[key], value), key
    assert float(new.bfr.head.weight.detach().abs().max()) == 0.0  # still the V-SHARP start
    assert not torch.equal(new.state_dict()["bfr.up.0.weight"], old.state_dict()["bfr.up.0.weight"])


def test_a_background_removal_run_ships_as_nextqsm(tmp_path):
    from qsmprep.dl.nextqsm import VSHARP_PRIOR
    from qsmprep.train.export import export

    small = {"bfr": {**SMALL, "vsharp": VSHARP_PRIOR}, "vn": {**SMALL, "steps": 1}}
    train("nextqsm-bfr", tmp_path / "run", _stream, [_sample(7)], steps=1, config=small,
          validate_every=1, progress=False)
    # one held-out whole head (of the card's two) keeps the suite short
    val, _ = export("nextqsm-bfr", tmp_path / "run", tmp_path / "models", whole_heads=1)
    assert {"val_nrmse_local", "val_nrmse_chi", "val_nrmse_chi_dipole"} <= set(val)
    card = (tmp_path / "models" / "nextqsm.md").read_text()
    assert "trained with `qsmprep-train nextqsm-bfr`" in card
    assert "Retrain: `qsmprep-train nextqsm-bfr " in card
    assert "| local: V-SHARP input alone (the untrained background removal) |" in card


def test_a_variational_network_run_trains_the_vn_alone_and_ships_as_nextqsm(tmp_path):
    """``nextqsm-vn`` learns chi from the true local field: the VN's weights
    and step sizes move, the background removal of ``--init`` stays bit for
    bit, and the run exports a whole NeXtQSM."""
    from qsmprep.dl.nextqsm import VSHARP_PRIOR, NeXtQSM
    from qsmprep.train.export import export

    small = {"bfr": {**SMALL, "vsharp": VSHARP_PRIOR}, "vn": {**SMALL, "steps": 2}}
    torch.manual_seed(2)
    start = NeXtQSM(small)
    with torch.no_grad():
        for p in start.bfr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": start.state_dict()}, tmp_path / "start.pt")
    model, _ = train("nextqsm-vn", tmp_path / "run", _stream, [_sample(7)], steps=6, lr=1e-2,
                     config=small, init=tmp_path / "start.pt", validate_every=6, progress=False)
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert np.isfinite(float(rows[-1]["val_nrmse_chi_dipole"]))
    for key, value in start.state_dict().items():
        if key.startswith("bfr."):
            assert torch.equal(model.state_dict()[key], value), key
    assert not torch.equal(model.alpha_raw, start.alpha_raw)
    assert float(model.regulariser.head.weight.detach().abs().max()) > 0
    export("nextqsm-vn", tmp_path / "run", tmp_path / "models", whole_heads=1)
    card = (tmp_path / "models" / "nextqsm.md").read_text()
    assert "trained with `qsmprep-train nextqsm-vn`" in card
    assert "held-out whole heads (1 mm, 1)" in card


def test_data_overrides_are_checked_and_reach_the_retrain_line(tmp_path):
    from qsmprep.train.data import DATA, content_options, sample_options
    from qsmprep.train.export import WHOLE_HEADS, _retrain_command, run_config

    with pytest.raises(ValueError, match="lesion.*hybrid_sample takes"):
        sample_options("unet", {"lesion": True})
    options = sample_options("unet", {"lesions": True})
    assert options == {**DATA["unet"], "lesions": True}
    assert content_options(options) == {"lesions": True}  # whole heads: no patch options
    train("unet", tmp_path / "run", _stream, [_sample(7)], steps=2, config=SMALL,
          progress=False, data_options={**options, "patch_size": 40})
    cfg = run_config(tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    line = _retrain_command(TASKS["unet"], cfg, ckpt)
    assert "--patch 40" in line and """--data '{"lesions": true}'""" in line
    # every sample option that differs from the model's data reaches --data, voxel sizes too
    cfg["data"]["voxel_size_range_mm"] = [0.7, 1.5]
    line = _retrain_command(TASKS["unet"], cfg, ckpt)
    assert """--data '{"voxel_size_range_mm": [0.7, 1.5], "lesions": true}'""" in line
    # the held-out heads best.pt was selected on: none in this run (patches), so the
    # line repeats it; the default number of heads needs no option
    assert cfg["validation_whole"] == 0 and "--validation-whole 0" in line
    cfg["validation_whole"] = WHOLE_HEADS
    assert "--validation-whole" not in _retrain_command(TASKS["unet"], cfg, ckpt)
