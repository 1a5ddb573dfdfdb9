"""mmkernels.integrations.transformers against transformers' own CLIPModel and
SiglipModel losses, on tiny randomly initialised models (no download).

The peer is ``model(..., return_loss=True).loss`` in the same process: its value
and every parameter's gradient, in the model's dtype (fp32, fp64) and from an
fp64 copy of the same model (the reference the tolerances are calibrated
against). Plus: the options, the shapes of every tensor the loss creates, and
the import graph.
"""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tolerances import TOLERANCE, assert_matches

transformers = pytest.importorskip("transformers")
from mmkernels.integrations.transformers import clip_loss, siglip_loss  # noqa: E402

# Token ids of the tiny vocabulary: CLIP pools the first eos, SigLIP the last position.
VOCAB, PAD, BOS, EOS = 99, 1, 97, 98
TEXT_LENGTH, IMAGE_SIZE = 7, 16  # 7 tokens; (16 / 8)^2 = 4 patches + 1


def tiny_config(kind):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=20, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4)
    if kind == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def model(request):
    """A tiny random CLIPModel or SiglipModel (fp32, eval mode)."""
    torch.manual_seed(0)
    kind = request.param
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    model = cls(tiny_config(kind)).eval()
    if kind == "siglip":  # SigLIP's own initialisation, not the zeros of the random init
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-5.0)
    model.kind = kind
    return model


def loss_fn(model):
    return clip_loss if model.kind == "clip" else siglip_loss


def make_batch(n, padded, dtype=torch.float32, seed=0):
    """n captions (bos, words, eos, then pads where ``padded``) and n images."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(3, TEXT_LENGTH + 1, (n,), generator=gen) if padded
               else torch.full((n,), TEXT_LENGTH))
    if padded:
        lengths[0] = 3  # at least one padded caption, even at n = 1
    input_ids = torch.randint(3, BOS, (n, TEXT_LENGTH), generator=gen)
    input_ids[:, 0] = BOS
    input_ids[torch.arange(n), lengths - 1] = EOS
    attention_mask = (torch.arange(TEXT_LENGTH) < lengths[:, None]).long()
    input_ids[attention_mask == 0] = PAD
    pixel_values = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen, dtype=dtype)
    return dict(input_ids=input_ids, pixel_values=pixel_values,
                attention_mask=attention_mask if padded else None)


def model_loss(model, batch, **model_kwargs):
    """The model's own loss; from its logits where a version computes none."""
    out = model(**batch, return_loss=True, **model_kwargs)
    if out.loss is not None:
        return out.loss
    return logits_loss(model.kind, out.logits_per_text)


def logits_loss(kind, logits_per_text, reduction="mean", label_smoothing=0.0):
    """CLIPModel's and SiglipModel's loss formulas on the (N, N) logits_per_text."""
    n = logits_per_text.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        per_text = F.cross_entropy(logits_per_text, labels, reduction="none",
                                   label_smoothing=label_smoothing)
        per_image = F.cross_entropy(logits_per_text.T, labels, reduction="none",
                                    label_smoothing=label_smoothing)
        per_row = (per_text + per_image) / 2
    else:
        signs = 2 * torch.eye(n, dtype=logits_per_text.dtype) - 1
        per_row = -F.logsigmoid(signs * logits_per_text).sum(1)  # per text
    return {"mean": per_row.mean, "sum": per_row.sum, "none": lambda: per_row}[reduction]()


def loss_and_grads(model, compute):
    """``compute(model)``, backpropagated: (loss, {parameter name: gradient or None})."""
    model.zero_grad(set_to_none=True)
    loss = compute(model)
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone()
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(got, expected, dtype, what):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert_matches(loss, ref_loss, dtype, f"{what}: loss")
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (grads[name] is None) == (ref is None), f"{what}: {name} has a gradient in one only"
        if ref is not None:
            assert_matches(grads[name], ref, dtype, f"{what}: gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_loss_and_gradients_equal_the_models(model, backend, n, padded, dtype):
    """Value and every parameter's gradient (logit_scale, logit_bias included)
    equal the model's own, in its dtype and against its fp64 copy."""
    model64 = copy.deepcopy(model).double()
    here = model if dtype == torch.float32 else model64
    batch = make_batch(n, padded, dtype)
    batch64 = dict(batch, pixel_values=batch["pixel_values"].double())
    got = loss_and_grads(here, lambda m: loss_fn(m)(m, **batch, backend=backend))
    assert got[1]["logit_scale"] is not None
    if model.kind == "siglip":
        assert got[1]["logit_bias"] is not None
    peer = loss_and_grads(here, lambda m: model_loss(m, batch))
    assert_same(got, peer, dtype, f"{model.kind} against the model, same dtype")
    reference = loss_and_grads(model64, lambda m: model_loss(m, batch64))
    assert_same(got, reference, dtype, f"{model.kind} against the fp64 model")


def test_model_loss_is_the_logits_formula(model):
    """What the test matches: the installed model's loss is the formula of
    logits_loss on its logits_per_text (so the reference is pinned here too)."""
    batch = make_batch(6, padded=True)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.loss is not None, "this transformers version computes no loss"
    torch.testing.assert_close(out.loss, logits_loss(model.kind, out.logits_per_text),
                               rtol=TOLERANCE[torch.float32][0], atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(model, backend, reduction):
    """"none" is per pair for CLIP and per text (the model's nll) for SigLIP."""
    batch = make_batch(5, padded=True)
    with torch.no_grad():
        logits = model(**batch).logits_per_text.double()
        got = loss_fn(model)(model, **batch, reduction=reduction, backend=backend)
    assert_matches(got, logits_loss(model.kind, logits, reduction), torch.float32, reduction)


def test_clip_label_smoothing(model, backend):
    """An option that changes the loss on purpose is passed through."""
    if model.kind != "clip":
        pytest.skip("label_smoothing is CLIP's")
    batch = make_batch(5, padded=True)
    with torch.no_grad():
        logits = model(**batch).logits_per_text.double()
        got = clip_loss(model, **batch, label_smoothing=0.1, backend=backend)
    assert_matches(got, logits_loss("clip", logits, label_smoothing=0.1), torch.float32)


def test_position_ids_and_interpolated_positions(model):
    """The forward's other inputs reach the towers as in the forward."""
    batch = make_batch(4, padded=True)
    batch["pixel_values"] = torch.randn(4, 3, 24, 24)  # 9 patches for a 4-patch model
    position_ids = torch.arange(TEXT_LENGTH).flip(0).expand(4, -1)
    kwargs = dict(position_ids=position_ids, interpolate_pos_encoding=True)
    with torch.no_grad():
        expected = model_loss(model, batch, **kwargs)
        got = loss_fn(model)(model, **batch, **kwargs)
        plain = loss_fn(model)(model, **batch, interpolate_pos_encoding=True)
    assert_matches(got, expected.double(), torch.float32)
    assert abs(plain.item() - got.item()) > 1e-6  # position_ids did change the loss


def test_tuple_outputs(model):
    """With config.return_dict False, get_*_features return tuples: same loss."""
    batch = make_batch(3, padded=True)
    with torch.no_grad():
        expected = loss_fn(model)(model, **batch)
        model.config.return_dict = False
        try:
            outputs = model.get_text_features(batch["input_ids"])
            got = loss_fn(model)(model, **batch)
        finally:
            model.config.return_dict = True
    # transformers 5 returns model outputs, hence tuples here; 4.x returned tensors
    assert isinstance(outputs, tuple) or int(transformers.__version__.split(".")[0]) < 5
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _Stub(torch.nn.Module):
    """A model whose towers count their calls and return ``features``."""

    def __init__(self, features):
        super().__init__()
        self.features, self.calls = features, 0
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))
        self.logit_bias = torch.nn.Parameter(torch.zeros(()))

    def get_image_features(self, pixel_values):
        self.calls += 1
        return self.features

    def get_text_features(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.features


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
def test_option_errors_before_the_towers(fn):
    stub = _Stub(torch.randn(3, 4))
    ids, pixels = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, 2, 2)
    for name, value in [("normalize", False), ("normalize", True), ("logit_scale", 1.0),
                        ("logit_bias", 0.0), ("temperature", 0.07)]:
        with pytest.raises(TypeError, match=f"^{name}:"):
            fn(stub, ids, pixels, **{name: value})
    if fn is siglip_loss:
        with pytest.raises(TypeError, match="^label_smoothing:"):
            fn(stub, ids, pixels, label_smoothing=0.1)
    assert stub.calls == 0
    with pytest.raises(ValueError, match="reduction"):  # a value: mmkernels' own check
        fn(stub, ids, pixels, reduction="average")
    assert fn(stub, ids, pixels).isfinite()


def test_model_errors():
    ids, pixels = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, 2, 2)
    with pytest.raises(TypeError, match="^model: .*without get_image_features"):
        clip_loss(torch.nn.Linear(2, 2), ids, pixels)
    no_bias = _Stub(torch.randn(3, 4))
    del no_bias.logit_bias
    with pytest.raises(TypeError, match="^model: .*without logit_bias"):
        siglip_loss(no_bias, ids, pixels)
    assert clip_loss(no_bias, ids, pixels).isfinite()  # CLIP needs no bias
    odd = _Stub({"features": torch.randn(3, 4)})
    with pytest.raises(TypeError, match="get_image_features returned dict"):
        clip_loss(odd, ids, pixels)


class _ShapeRecorder(TorchDispatchMode):
    """The shape of every tensor each ATen op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [(str(func), tuple(t.shape)) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor)]
        return out


def square_tensors(compute, model, n):
    """The ops that return a tensor with two dimensions of size n, in the
    forward and in the backward of ``compute(model)``."""
    found = {}
    model.zero_grad(set_to_none=True)
    for phase in ("forward", "backward"):
        with _ShapeRecorder() as recorder:
            if phase == "forward":
                loss = compute(model)
            else:
                loss.backward()
        found[phase] = sorted({op for op, shape in recorder.shapes
                               if sum(size == n for size in shape) >= 2})
    model.zero_grad(set_to_none=True)
    return found


def test_no_n_by_n_tensor(model, backend, small_tiles):
    """No op, forward or backward, returns an N x N tensor, as the model's own loss does.

    A TorchDispatchMode sees every ATen op below autograd (the towers, the
    loss's O(N*D) terms, the backward); the kernels are opaque ops to it, and
    small_tiles bounds their tiles to 8 x 16 < N. N = 40 is no size of the
    model (32, 37, 16, 7, 5, 4, 8, 99), so two dimensions of size N can only be
    logits. The naive backend materializes them by definition.
    """
    if backend == "naive":
        pytest.skip("the naive backend materializes the logits")
    n = 40
    batch = make_batch(n, padded=True)
    theirs = square_tensors(lambda m: model_loss(m, batch), model, n)
    assert theirs["forward"] and theirs["backward"], theirs  # the recorder sees the logits
    ours = square_tensors(lambda m: loss_fn(m)(m, **batch, backend=backend), model, n)
    assert ours == {"forward": [], "backward": []}, ours


def test_import_mmkernels_leaves_transformers_alone():
    code = ("import sys, mmkernels, mmkernels.integrations.transformers; "
            "assert 'transformers' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
