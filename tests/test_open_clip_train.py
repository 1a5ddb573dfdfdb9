"""mmkernels.integrations.open_clip (patch / unpatch of open_clip.create_loss)
and ``python -m mmkernels.integrations.open_clip_train``, against open_clip's
own trainer in the same process.

The trainer runs a tiny CLIP (one-layer towers, 32 x 32 images, a model config
added through open_clip.add_model_config) for 3 fp32 CPU steps of 8 pairs,
once as open_clip_train.main and once patched, with the same seed. Every
step's loss and the final parameters must agree to 1e-5 relative, for the
CLIP loss, for ``--siglip``, and under torchrun with 2 gloo processes for
``--gather-with-grad --local-loss`` and for ``--siglip``. The pairs are real
(random images with distinct captions, ``--dataset-type csv``): open_clip's
``--dataset-type synthetic`` repeats one blank image and one caption, so its
CLIP loss is log(batch) whatever the weights and its gradients are zero
(checked on its own, for both runs).

One exception to the parameter check: the attention's key biases. A key bias
adds the same ``q_i . b_k`` to every logit of query i, which cancels in the
softmax, so their exact gradient is zero and both runs compute round-off
there; AdamW scales round-off to steps of up to ``lr``, different in each
run. They are checked to stay within those steps of their initial value.
"""

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train.main")  # open_clip_torch[training]: webdataset, pandas, ...

import open_clip.factory  # noqa: E402
import open_clip.loss  # noqa: E402
import open_clip_train.main  # noqa: E402

import mmkernels  # noqa: E402
import open_clip_train_worker as worker  # noqa: E402
from mmkernels.integrations import open_clip as integration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, LR = 3, 8, 1e-3  # as worker.trainer_args sets them
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _never_left_patched():
    yield
    was_patched = integration.is_patched()
    integration.unpatch()
    assert not was_patched, "a test left open_clip patched"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_train")
    open_clip.add_model_config(worker.write_model_config(root / "configs"))
    return {"root": root, "csv": worker.write_dataset(root / "pairs", STEPS * BATCH)}


# --- patch / unpatch -------------------------------------------------------------------

def _args(**changes):
    """The attributes of open_clip_train's parsed arguments that create_loss reads."""
    args = dict(distill=False, model=worker.MODEL, siglip=False, horovod=False,
                local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                loss_dist_impl=None, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0)
    args.update(changes)
    return argparse.Namespace(**args)


CLIP_SETTINGS = ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size")
SIGLIP_SETTINGS = ("cache_labels", "rank", "world_size", "dist_impl")
CASES = [
    ({}, mmkernels.ClipLoss, CLIP_SETTINGS),
    ({"local_loss": True, "gather_with_grad": True, "rank": 1, "world_size": 4},
     mmkernels.ClipLoss, CLIP_SETTINGS),
    ({"gather_with_grad": True, "rank": 2, "world_size": 3}, mmkernels.ClipLoss, CLIP_SETTINGS),
    ({"siglip": True}, mmkernels.SigLipLoss, SIGLIP_SETTINGS),
    ({"siglip": True, "rank": 1, "world_size": 2, "loss_dist_impl": "shift"},
     mmkernels.SigLipLoss, SIGLIP_SETTINGS),
    ({"siglip": True, "rank": 3, "world_size": 4, "loss_dist_impl": "gather"},
     mmkernels.SigLipLoss, SIGLIP_SETTINGS),
]


@pytest.mark.parametrize("changes, ours, settings", CASES)
def test_patch_builds_mmkernels_loss_with_open_clips_arguments(changes, ours, settings):
    args = _args(**changes)
    theirs = open_clip.create_loss(args)
    assert type(theirs).__module__ == "open_clip.loss"
    integration.patch()
    # Every reference to create_loss, the trainer's (imported by name) included.
    for create_loss in (open_clip.create_loss, open_clip.factory.create_loss,
                        open_clip_train.main.create_loss):
        built = create_loss(args)
        assert type(built) is ours
        assert {s: getattr(built, s) for s in settings} == {s: getattr(theirs, s) for s in settings}
        assert built.backend == "auto"
    integration.unpatch()
    assert type(open_clip.create_loss(args)) is type(theirs)
    assert open_clip.factory.ClipLoss is open_clip.loss.ClipLoss
    assert open_clip.factory.SigLipLoss is open_clip.loss.SigLipLoss


def test_patch_options_and_idempotence():
    integration.patch(backend="torch", strategy="gather")
    integration.patch(backend="torch", strategy="gather")  # again: no second layer
    assert open_clip.factory.ClipLoss.__name__ == "_clip_loss"
    clip = open_clip.create_loss(_args(world_size=2, rank=1))
    siglip = open_clip.create_loss(_args(siglip=True))
    assert (clip.backend, clip.strategy, siglip.backend) == ("torch", "gather", "torch")
    integration.unpatch()
    assert not integration.is_patched()
    assert open_clip.factory.ClipLoss is open_clip.loss.ClipLoss
    integration.unpatch()  # not patched: nothing to do


@pytest.mark.parametrize("option, value", [("backend", "fast"), ("strategy", "tree")])
def test_patch_refuses_unknown_options(option, value):
    with pytest.raises(ValueError, match=option):
        integration.patch(**{option: value})
    assert not integration.is_patched()
    assert open_clip.factory.ClipLoss is open_clip.loss.ClipLoss


def _settings(module) -> dict:
    """A loss module's public attributes (its constructor's settings)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


@pytest.mark.parametrize("changes, theirs", [
    ({"model": "coca_ViT-B-32"}, open_clip.loss.CoCaLoss),
    ({"distill": True}, open_clip.loss.DistillClipLoss),
    ({"horovod": True}, open_clip.loss.ClipLoss),
])
def test_losses_it_cannot_take_over_are_left_to_open_clip(changes, theirs, caplog):
    args = _args(**changes)
    expected = _settings(open_clip.create_loss(args))
    integration.patch()
    with caplog.at_level(logging.INFO, logger=integration.LOGGER.name):
        built = open_clip_train.main.create_loss(args)
    integration.unpatch()
    assert type(built) is theirs
    assert _settings(built) == expected
    notices = [r for r in caplog.records if r.name == integration.LOGGER.name]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    assert "left to open_clip" in notices[0].getMessage()
    assert "\n" not in notices[0].getMessage()


# --- the trainer, patched against unpatched ------------------------------------------------

def _is_key_bias(name: str) -> bool:
    return name.endswith("attn.in_proj_bias")


def _key_third(tensor: torch.Tensor) -> slice:
    width = tensor.numel() // 3  # in_proj_bias = [query; key; value]
    return slice(width, 2 * width)


def assert_same_training(ours: dict, theirs: dict, initial: dict) -> None:
    """Step losses and final parameters (name -> tensor) agree to RTOL."""
    assert len(ours["losses"]) == len(theirs["losses"]) == STEPS, (ours["losses"], theirs["losses"])
    for step, (a, b) in enumerate(zip(ours["losses"], theirs["losses"])):
        assert abs(a - b) <= RTOL * abs(b), (step, a, b)
    assert len(set(theirs["losses"])) == STEPS  # real pairs: the loss moves step to step
    assert ours["params"].keys() == theirs["params"].keys() == initial.keys()
    for name, b in theirs["params"].items():
        a, start = ours["params"][name].double(), initial[name].double()
        b = b.double()
        moved = (b - start).norm().item()
        assert moved > 10 * RTOL * b.norm().item(), (name, moved)  # the comparison means something
        if _is_key_bias(name):
            keys = _key_third(b)
            assert (a[keys] - start[keys]).abs().max() <= 2 * STEPS * LR
            assert (b[keys] - start[keys]).abs().max() <= 2 * STEPS * LR
            a, b = torch.cat([a[:keys.start], a[keys.stop:]]), torch.cat([b[:keys.start], b[keys.stop:]])
        assert (a - b).norm().item() <= RTOL * b.norm().item(), (name, (a - b).norm().item(), b.norm().item())


def _final_params(logs: Path, name: str) -> dict:
    state = torch.load(logs / name / "checkpoints" / "epoch_1.pt", map_location="cpu",
                       weights_only=False)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _logged_losses(logs: Path, name: str) -> list[str]:
    """The "Loss: X (mean)" of every "Train Epoch" line of the run's out.log."""
    text = (logs / name / "out.log").read_text()
    return [re.search(r" Loss: (\S+) \(", line).group(1)
            for line in text.splitlines() if "Train Epoch:" in line]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_trainer_patched_equals_open_clips(data, loss):
    logs = data["root"] / "logs"
    extra = ["--siglip"] if loss == "siglip" else []
    runs = {}
    for patched in (False, True):
        name = f"{loss}-{'patched' if patched else 'plain'}"
        recorder = worker.train(worker.trainer_args(data["csv"], logs, name, BATCH) + extra,
                                patched)
        assert not integration.is_patched()  # the CLI's main undoes its patch
        runs[patched] = {"losses": recorder.losses, "types": recorder.loss_types,
                         "params": _final_params(logs, name), "initial": recorder.initial,
                         "logged": _logged_losses(logs, name),
                         "log": (logs / name / "out.log").read_text()}
    plain, patched = runs[False], runs[True]
    kind = "SigLipLoss" if loss == "siglip" else "ClipLoss"
    assert plain["types"] == {f"open_clip.loss.{kind}"}
    assert patched["types"] == {f"mmkernels.nn.{kind}"}
    assert f"using mmkernels.{kind}" in patched["log"]
    assert "using mmkernels" not in plain["log"]
    # The logged losses are the recorded ones (as the trainer prints them).
    for run in runs.values():
        assert run["logged"] == [f"{value:#.5g}" for value in run["losses"]]
    assert all(torch.equal(plain["initial"][k], v) for k, v in patched["initial"].items())
    if loss == "clip":
        assert plain["losses"][0] == pytest.approx(math.log(BATCH), rel=0.1)  # an untrained model
    assert_same_training(patched, plain, plain["initial"])


def test_trainer_on_open_clips_synthetic_dataset(data):
    """``--dataset-type synthetic``: one blank image and one caption for every
    sample, so every logit is equal and the CLIP loss is log(batch) in both
    runs, whatever the weights. Its exact gradients are zero, so AdamW turns
    each run's round-off into steps of up to ``lr`` (a quarter of the entries
    of a weight differed by up to 4e-3 here): the parameters say nothing, and
    the comparison of training runs uses real pairs (above)."""
    logs = data["root"] / "logs"
    runs = {}
    for patched in (False, True):
        name = f"synthetic-{'patched' if patched else 'plain'}"
        recorder = worker.train(worker.trainer_args(None, logs, name, BATCH, STEPS * BATCH),
                                patched)
        runs[patched] = recorder.losses, recorder.loss_types
    for losses, _ in runs.values():
        assert losses == pytest.approx([math.log(BATCH)] * STEPS, rel=1e-6)
    assert runs[True][1] == {"mmkernels.nn.ClipLoss"} and runs[False][1] == {"open_clip.loss.ClipLoss"}


# --- torchrun, 2 gloo processes ---------------------------------------------------------------

TORCHRUN_CASES = {"clip": ["--gather-with-grad", "--local-loss"], "siglip": ["--siglip"]}


@pytest.fixture(scope="module")
def torchrun_runs(data) -> dict:
    """(case, mode) -> the ranks' reports, final parameters, initial
    parameters and log of that run: every run of TORCHRUN_CASES, plain and
    patched, one after another in one torchrun launch of 2 processes."""
    out, logs = data["root"] / "torchrun", data["root"] / "torchrun-logs"
    out.mkdir()
    runs = [{"name": f"{case}-{mode}", "mode": mode,
             # 2 ranks x 4 pairs: the same 8-pair global batches as one process sees
             "argv": worker.trainer_args(data["csv"], logs, f"{case}-{mode}", BATCH // 2) + extra}
            for case, extra in TORCHRUN_CASES.items() for mode in ("plain", "patched")]
    (out / "runs.json").write_text(json.dumps(runs))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH")])))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(Path(worker.__file__)), str(out), str(data["root"] / "configs"), str(out / "runs.json")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(case, mode): {
        "ranks": [json.loads((out / f"{case}-{mode}-rank{r}.json").read_text()) for r in range(2)],
        "params": _final_params(logs, f"{case}-{mode}"),
        "initial": torch.load(out / f"{case}-{mode}-initial.pt", weights_only=True),
        "log": (logs / f"{case}-{mode}" / "out.log").read_text()}
        for case in TORCHRUN_CASES for mode in ("plain", "patched")}


@pytest.mark.slow
@pytest.mark.parametrize("case", TORCHRUN_CASES)
def test_torchrun_two_gloo_processes(torchrun_runs, case):
    """open_clip_train under torchrun (2 gloo processes): ``--gather-with-grad
    --local-loss`` for the CLIP loss, and ``--siglip`` (its default
    ``bidir`` exchange); each rank's loss of every step, and the final parameters."""
    plain, patched = torchrun_runs[case, "plain"], torchrun_runs[case, "patched"]
    kind = "SigLipLoss" if case == "siglip" else "ClipLoss"
    assert "world_size=2" in patched["log"] and f"using mmkernels.{kind}" in patched["log"]
    assert all(torch.equal(plain["initial"][k], v) for k, v in patched["initial"].items())
    for rank in range(2):
        assert plain["ranks"][rank]["loss_types"] == [f"open_clip.loss.{kind}"]
        assert patched["ranks"][rank]["loss_types"] == [f"mmkernels.nn.{kind}"]
        assert_same_training({"losses": patched["ranks"][rank]["losses"], "params": patched["params"]},
                             {"losses": plain["ranks"][rank]["losses"], "params": plain["params"]},
                             plain["initial"])
    # Each rank's loss is its own rows' (local_loss; SigLIP's is per rank): the ranks differ.
    assert plain["ranks"][0]["losses"] != plain["ranks"][1]["losses"]
