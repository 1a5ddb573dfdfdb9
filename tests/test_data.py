"""Data: CSV/TSV/JSONL datasets and their bad-data paths, Pillow transforms,
the synthetic dataset, and the deterministic, resumable batch loader."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmkernels.data import (BatchFetcher, CaptionFileDataset, SampleError, SyntheticShapes, batches,
                            load_items, open_dataset)
from mmkernels.data import synthetic
from mmkernels.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform
from mmkernels.models import HashTokenizer

TOKENIZER = HashTokenizer(vocab_size=512, context_length=16)


@pytest.fixture
def image_dir(tmp_path):
    """Four small images of different sizes, a missing path and a corrupt file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(20, 20), (40, 24), (24, 40), (16, 16)]):
        Image.new("RGB", size, (60 * i, 100, 200)).save(folder / f"img{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    return tmp_path


def _write_csv(path, rows, header=("filepath", "title"), sep=","):
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- file formats ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_formats_load_images_and_captions(image_dir, fmt):
    rows = [(f"images/img{i}.png", f"caption {i}") for i in range(4)]
    path = image_dir / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    else:
        _write_csv(path, rows, sep="," if fmt == "csv" else "\t")
    ds = open_dataset(str(path), image_size=8, train=False)
    assert len(ds) == 4 and ds.caption(2) == "caption 2"
    image, caption = ds.load(1)
    assert image.shape == (3, 8, 8) and caption == "caption 1"
    assert ds.group(0) != ds.group(1)


def test_custom_keys_and_separator(image_dir):
    path = _write_csv(image_dir / "data.csv", [("images/img0.png", "a")], header=("img", "text"), sep=";")
    ds = CaptionFileDataset(path, 8, image_key="img", caption_key="text", separator=";")
    assert ds.load(0)[1] == "a"


def test_relative_paths_resolve_beside_the_data_file(image_dir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    path = _write_csv(image_dir / "data.csv", [("images/img0.png", "a")])
    assert CaptionFileDataset(path, 8).load(0)[0].shape == (3, 8, 8)


def test_bad_csv_header_is_a_clear_error(image_dir):
    path = _write_csv(image_dir / "data.csv", [("images/img0.png", "a")], header=("path", "title"))
    with pytest.raises(ValueError, match=r"no column 'filepath'; header columns: \['path', 'title'\]"):
        CaptionFileDataset(path, 8)
    tab_file = _write_csv(image_dir / "tabs.csv", [("images/img0.png", "a")], sep="\t")
    with pytest.raises(ValueError, match="is the separator ',' right"):
        CaptionFileDataset(tab_file, 8)
    (image_dir / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        CaptionFileDataset(image_dir / "empty.csv", 8)
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_dataset(str(image_dir / "images" / "img0.png"), image_size=8, train=True)
    with pytest.raises(ValueError, match="no such file"):
        open_dataset(str(image_dir / "nope.csv"), image_size=8, train=True)


def test_empty_captions_and_bad_lines_are_counted_skips(image_dir):
    path = _write_csv(image_dir / "data.csv", [("images/img0.png", "a"), ("images/img1.png", "  "),
                                               ("", "no image"), ("images/img2.png", "c")])
    ds = CaptionFileDataset(path, 8)
    assert len(ds) == 2 and ds.skipped_rows == {"empty caption": 1, "empty image path": 1}
    jsonl = image_dir / "data.jsonl"
    jsonl.write_text('{"image": "images/img0.png", "caption": "a"}\n{not json\n[1, 2]\n'
                     '{"image": "images/img1.png", "caption": ""}\n')
    ds = CaptionFileDataset(jsonl, 8)
    assert len(ds) == 1
    assert ds.skipped_rows == {"invalid JSON line": 1, "JSON line is not an object": 1, "empty caption": 1}
    only_empty = _write_csv(image_dir / "bad.csv", [("images/img0.png", "")])
    with pytest.raises(ValueError, match="no usable row"):
        CaptionFileDataset(only_empty, 8)
    wrong_keys = image_dir / "keys.jsonl"
    wrong_keys.write_text('{"path": "images/img0.png", "text": "a"}\n')
    with pytest.raises(ValueError, match="has the key 'image' or 'caption'"):
        CaptionFileDataset(wrong_keys, 8)


def test_missing_and_unreadable_images_are_skipped_by_the_loader(image_dir):
    rows = [("images/img0.png", "a"), ("images/missing.png", "b"), ("images/corrupt.jpg", "c"),
            ("images/img1.png", "d")]
    ds = CaptionFileDataset(_write_csv(image_dir / "data.csv", rows), 8)
    with pytest.raises(SampleError, match="missing image file"):
        ds.load(1)
    with pytest.raises(SampleError, match="unreadable image"):
        ds.load(2)
    batch = BatchFetcher(ds, TOKENIZER, batch_size=4, seed=0, shuffle=False)[0]
    assert batch.images.shape == (2, 3, 8, 8) and batch.tokens.shape == (2, 16)
    assert sorted(i for i, _ in batch.skipped) == [1, 2]
    images, tokens, kept, skipped = load_items(ds, TOKENIZER, range(4))
    assert kept == [0, 3] and len(skipped) == 2 and images.shape[0] == tokens.shape[0] == 2


# --- transforms -----------------------------------------------------------------------

def test_eval_transform_resizes_crops_and_normalizes():
    image = Image.new("RGB", (60, 30), (255, 255, 255))
    out = EvalTransform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out[:, 8, 8], expected)


def test_train_transform_is_a_function_of_its_rng():
    import random

    image = Image.effect_noise((48, 40), 60).convert("RGB")
    t = TrainTransform(16, scale=(0.3, 0.6))
    a = t(image, random.Random(1))
    assert a.shape == (3, 16, 16)
    torch.testing.assert_close(t(image, random.Random(1)), a)
    assert not torch.equal(t(image, random.Random(2)), a)
    torch.testing.assert_close(t(image, None), EvalTransform(16)(image))


# --- synthetic data ------------------------------------------------------------------

def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticShapes("train", image_size=16), SyntheticShapes("train", image_size=16)
    image, caption = a.load(7)
    torch.testing.assert_close(b.load(7)[0], image)
    assert b.load(7)[1] == caption == a.caption(7)
    assert SyntheticShapes("val", image_size=16).caption(7) != caption or \
        not torch.equal(SyntheticShapes("val", image_size=16).load(7)[0], image)
    assert len({a.caption(i) for i in range(200)}) > 150
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("test")


def test_synthetic_captions_describe_the_picture():
    """The named colour covers a region centred in the named ninth of the image,
    and larger size words cover more pixels."""
    ds = SyntheticShapes("val", image_size=32)
    areas = {size: [] for size in synthetic.SIZES}
    for i in range(120):
        scene, _, rng = ds._item(i)
        pixels = torch.from_numpy(np.array(synthetic.render(scene, 32, rng))).float().view(-1, 3)
        colour = torch.tensor(synthetic.COLOURS[scene.colour], dtype=torch.float)
        mask = ((pixels - colour).norm(dim=1) < 60).view(32, 32)
        assert mask.any(), scene
        ys, xs = mask.nonzero(as_tuple=True)
        col, row = synthetic.POSITIONS[scene.position]
        assert int(xs.float().mean() * 3 / 32) == col and int(ys.float().mean() * 3 / 32) == row, scene
        areas[scene.size].append(mask.float().mean())
    mean = {k: sum(v) / len(v) for k, v in areas.items()}
    assert mean["small"] < mean["medium"] < mean["large"]
    assert scene.group() == synthetic.all_scenes().index(scene)
    assert len(synthetic.all_scenes()) == 1512


def test_synthetic_zeroshot_tasks():
    ds = SyntheticShapes("val", image_size=16)
    tasks = {t["name"]: t for t in ds.zeroshot_tasks(range(10))}
    assert set(tasks) == {"shape", "colour", "size", "position"}
    shape = tasks["shape"]
    assert shape["classes"][shape["labels"][3]] == ds.scene(3).shape
    assert all(shape["classes"][k] in p for k, prompts in enumerate(shape["prompts"]) for p in prompts)


# --- the batch loader ---------------------------------------------------------------------

def test_batches_are_a_function_of_seed_and_step():
    ds = SyntheticShapes("train", size=50, image_size=8)
    f = BatchFetcher(ds, TOKENIZER, batch_size=8, seed=3)
    again = BatchFetcher(SyntheticShapes("train", size=50, image_size=8), TOKENIZER, batch_size=8, seed=3)
    torch.testing.assert_close(f[4].images, again[4].images)
    assert not torch.equal(f[4].images, BatchFetcher(ds, TOKENIZER, batch_size=8, seed=4)[4].images)
    # one epoch visits every item once
    seen = [f._perms.index(p) for p in range(50)]
    assert sorted(seen) == list(range(50))
    # ranks split each global batch into contiguous slices
    halves = [BatchFetcher(ds, TOKENIZER, batch_size=8, seed=3, rank=r, world_size=2)[4] for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h.images for h in halves]), f[4].images)
    torch.testing.assert_close(torch.cat([h.tokens for h in halves]), f[4].tokens)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BatchFetcher(ds, TOKENIZER, batch_size=8, seed=3, world_size=3)


def test_worker_processes_give_the_same_batches():
    ds = SyntheticShapes("train", size=40, image_size=8)
    f = BatchFetcher(ds, TOKENIZER, batch_size=4, seed=0)
    state = torch.get_rng_state()
    inline = list(batches(f, 2, 5, workers=0))
    prefetched = list(batches(f, 2, 5, workers=1))
    assert torch.equal(torch.get_rng_state(), state)  # the loader leaves the global random state alone
    assert [b.step for b in prefetched] == [2, 3, 4]
    for a, b in zip(inline, prefetched):
        torch.testing.assert_close(a.images, b.images)
        torch.testing.assert_close(a.tokens, b.tokens)
