"""The trainer on a Hugging Face checkpoint (``--hf-model DIR``): tiny random
CLIPModel / SiglipModel and a CLIP processor saved to a temporary folder (no
download). The peer is transformers itself in the same process: the model's
own ``return_loss=True`` loss and its gradients, its processor, and
``from_pretrained`` of what the run saved.
"""

import json
import math
import string

import pytest
import torch

from mmkernels import train
from mmkernels.data import SyntheticShapes
from mmkernels.data.transforms import to_tensor
from mmkernels.train import hf
from mmkernels.train.step import contrastive_step

transformers = pytest.importorskip("transformers")
from mmkernels.integrations.transformers import clip_loss  # noqa: E402

IMAGE_SIZE, CONTEXT = 16, 48


def _text_config(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)


VISION = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4)


def _bpe_files(path):
    """vocab.json and merges.txt of a small BPE: every letter, digit and mark,
    and merges that spell out the words of the synthetic captions (so that a
    word is mostly one token, as in CLIP's own vocabulary)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    data = SyntheticShapes("train", size=400)
    words = sorted({w for i in range(len(data)) for w in data.caption(i).lower().split()
                    if w.isalpha()})
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            if f"{prefix} {piece}" not in merges:
                merges.append(f"{prefix} {piece}")
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def save_tiny_clip(path):
    """A random CLIPModel and its CLIPProcessor (the tokenizer of :func:`_bpe_files`)
    saved in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = _bpe_files(path)
    tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=_text_config(len(vocab)), vision_config=VISION,
                                     projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_siglip(path):
    """A random SiglipModel (SigLIP's initial scale 10 and bias -10) and a
    SiglipProcessor with the tokenizer of :func:`_bpe_files` saved in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = _bpe_files(path)
    tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=_text_config(len(vocab)),
                                                               vision_config=VISION))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(path)
    transformers.SiglipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")


def test_processor_sees_the_datasets_pixels(clip_dir):
    """A synthetic image goes to the processor as the exact pixels drawn (the
    normalized tensor inverts exactly), and comes out as the processor's own
    preprocessing of them."""
    model, processor = hf.load_pretrained(clip_dir)
    data = SyntheticShapes("val", size=4, image_size=IMAGE_SIZE)
    wrapped = hf.ProcessorDataset(data, processor)
    assert len(wrapped) == 4 and wrapped.caption(2) == data.caption(2)
    assert len(wrapped.zeroshot_tasks([0, 1])) == len(data.zeroshot_tasks([0, 1]))
    for i in range(4):
        image, caption = data.load(i)
        pixels = hf._pixels(image)
        assert torch.equal(to_tensor(pixels), image)
        got, got_caption = wrapped.load(i)
        want = processor.image_processor(images=pixels, return_tensors="pt")["pixel_values"][0]
        assert got_caption == caption and torch.equal(got, want)
    tokens = hf.ProcessorTokenizer(processor, CONTEXT)(["a red square", "a blue circle at the top"])
    assert tokens.shape == (2, CONTEXT) and tokens[0, 0] == 0 and (tokens == 1).any(dim=1).all()


def _siglip():
    torch.manual_seed(1)
    config = transformers.SiglipConfig(text_config=_text_config(90), vision_config=VISION)
    model = transformers.SiglipModel(config)
    with torch.no_grad():  # SigLIP's initial scale and bias, not the random init's zeros
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_step_is_the_models_own_loss(clip_dir, kind):
    """The trainer's step on the wrapped model, with and without gradient
    caching, gives the loss and every gradient (logit_scale, logit_bias
    included) of ``model(..., return_loss=True).loss``; for CLIP also the value
    of the integration's clip_loss."""
    model = hf.load_pretrained(clip_dir)[0] if kind == "clip" else _siglip()
    model.train()
    wrapped = hf.HFContrastiveModel(model)
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(9, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    input_ids = torch.randint(2, 80, (9, CONTEXT), generator=gen)
    input_ids[:, 0] = 0
    input_ids[torch.arange(9), torch.randint(3, CONTEXT, (9,), generator=gen)] = 1  # an eos each

    model.zero_grad(set_to_none=True)
    want = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert "logit_scale" in want_grads and (kind == "clip" or "logit_bias" in want_grads)
    if kind == "clip":
        with torch.no_grad():
            torch.testing.assert_close(clip_loss(model, input_ids, pixel_values), want.detach())
    for micro in (None, 4):
        model.zero_grad(set_to_none=True)
        loss = contrastive_step(wrapped, pixel_values, input_ids, wrapped.loss_function("torch"), micro)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == want_grads.keys()
        for k, g in grads.items():
            scale = want_grads[k].abs().max().item()
            torch.testing.assert_close(g, want_grads[k], rtol=1e-4, atol=max(1e-6, 1e-4 * scale),
                                       msg=lambda m: f"micro {micro}, {k}: {m}")


def fine_tune(model_dir, out, *, steps, batch):
    """``--hf-model model_dir`` for ``steps`` steps of ``batch`` pairs (cached in two
    micro-batches, one thread, lr 3e-3); asserts it exits 0 and returns the logged
    training losses."""
    threads = torch.get_num_threads()
    try:
        code = train.main(["--hf-model", str(model_dir), "--output", str(out), "--steps", str(steps),
                           "--batch-size", str(batch), "--micro-batch", str(batch // 2), "--lr", "3e-3",
                           "--val-size", str(batch), "--eval-every", "0", "--threads", "1",
                           "--log-every", "1", "--no-plot"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["kind"] == "train"]


def test_fine_tune_a_saved_clip_and_load_it_back(clip_dir, tmp_path, capsys):
    """--hf-model on the folder (gradient caching on): the loss falls well below
    log(64), the uniform guess, retrieval beats chance, and OUTPUT/hf loads back
    in transformers with the trained weights (those of last.pt, not the initial
    ones). About 30 CPU-seconds."""
    out = tmp_path / "run"
    losses = fine_tune(clip_dir, out, steps=100, batch=64)
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sum(losses[-5:]) / 5 < math.log(64) - 0.4, losses[::10]
    assert summary["collapsed"] is False and summary["hf_model"] == str(out / "hf")
    # Chance recall@10 over 64 pairs: 10/64 = 0.16 (measured here: 0.6 and 0.5).
    assert summary["i2t_recall@10"] > 0.25 and summary["t2i_recall@10"] > 0.25, summary

    reloaded = transformers.CLIPModel.from_pretrained(out / "hf", local_files_only=True)
    transformers.AutoProcessor.from_pretrained(out / "hf", local_files_only=True)
    initial = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True).state_dict()
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    state = reloaded.state_dict()
    assert {f"hf.{k}" for k in state} <= trained.keys()
    for k, v in state.items():
        assert torch.equal(v, trained[f"hf.{k}"]), k
    assert not torch.equal(state["visual_projection.weight"], initial["visual_projection.weight"])


def test_fine_tune_a_saved_siglip_and_load_it_back(tmp_path, capsys):
    """The same for a SiglipModel (its sigmoid loss, the bias trained through
    the cached step): the loss falls, and OUTPUT/hf loads back as a
    SiglipModel with the trained weights."""
    siglip_dir = save_tiny_siglip(tmp_path / "tiny-siglip")
    out = tmp_path / "run"
    losses = fine_tune(siglip_dir, out, steps=30, batch=32)
    capsys.readouterr()
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses[::5]  # measured: 9.1 -> 4.5
    reloaded = transformers.SiglipModel.from_pretrained(out / "hf", local_files_only=True)
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, trained[f"hf.{k}"]), k
    assert reloaded.logit_bias.item() != -10.0


def test_hf_model_argument_errors(clip_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--hf-model", str(tmp_path / "nothing"), "--output", str(tmp_path / "a")])
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--hf-model", str(clip_dir), "--model-arg", "dropout=0.1",
                    "--output", str(tmp_path / "b")])
    assert "does not apply to --hf-model" in capsys.readouterr().err


def test_two_processes_equal_one(clip_dir, tmp_path):
    """A CLIPModel data-parallel: 2 gloo processes under torchrun, in
    DistributedDataParallel with gradient caching, end on the parameters of
    one process on the same global batch: all but a handful of the entries
    (those whose gradient is round-off) to 1% of an AdamW step."""
    import subprocess
    import sys

    from test_train import ROOT, child_env

    args = ["--hf-model", str(clip_dir), "--steps", "3", "--batch-size", "12", "--micro-batch", "4",
            "--lr", "1e-3", "--warmup", "1", "--val-data", "none", "--no-plot", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "mmkernels.train",
                           "--output", str(tmp_path / "ddp"), *args], env=child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    threads = torch.get_num_threads()
    try:
        assert train.main(["--output", str(tmp_path / "one"), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp, one = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
                for name in ("ddp", "one"))
    assert ddp.keys() == one.keys()
    # AdamW moves an entry by about lr = 1e-3 a step whatever the size of its
    # gradient, so an entry whose gradient is near zero turns round-off into a
    # sizeable part of a step: entries off by more than 1% of a step were 2 of
    # 156k here, where a missing average puts nearly all of them off by steps.
    # The key biases' gradient is exactly zero in exact arithmetic (softmax
    # ignores a constant per row): all round-off, compared to one step.
    off = total = 0
    for k in ddp:
        if ddp[k].is_floating_point():
            diff = (ddp[k] - one[k]).abs()
            if k.endswith("k_proj.bias"):
                assert diff.max() < 1e-3, k
                continue
            assert diff.max() < 3 * 1e-3, k  # never more than the 3 steps could move it
            off += int((diff > 1e-5).sum())
            total += diff.numel()
    assert off <= 1e-4 * total, (off, total)
