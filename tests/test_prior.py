"""Stage 2: prompts, conditional priors (gated PixelCNN, transformer), sampling, resume, prompt accuracy.

Tiny models (a few thousand parameters) on a few hundred synthetic 28 x 28
images in three labelled classes, so that the file stays within seconds.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqkern.train import data as data_mod
from vqkern.train.cli import main
from vqkern.train.data import FASHION_MNIST_CLASSES
from vqkern.train.outputs import grid_size, read_jsonl
from vqkern.train.prior import GatedPixelCNN, TransformerPrior, draw
from vqkern.train.stage1 import train_vqvae
from vqkern.train.stage2 import PriorConfig, resolve_prior, sample_images, train_prior
from vqkern.train.text import Vocabulary

from test_train import _one_thread, tiny_config, write_idx  # noqa: F401 (_one_thread: an autouse fixture)

CLASSES = ("wide box", "tall box", "dot")


def labelled_images(n: int, seed: int = 0):
    """uint8 (n, 28, 28) and labels (n,): a wide rectangle (0), a tall one (1) or a small square (2)."""
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((n, 28, 28), np.uint8), rng.integers(0, 3, n)
    for img, c in zip(images, labels):
        h, w = [(5, 16), (16, 5), (5, 5)][c]
        y, x = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
        img[y:y + h, x:x + w] = rng.integers(160, 256)
    return images, labels


@pytest.fixture(scope="module")
def labelled_vqvae(tmp_path_factory):
    """A tiny VQ-VAE trained on an IDX folder with labels and classes.txt: its run folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labelled")
    data = root / "data"
    data.mkdir()
    for prefix, n, seed in (("train", 240, 0), ("t10k", 60, 1)):
        images, labels = labelled_images(n, seed)
        write_idx(data / f"{prefix}-images-idx3-ubyte", images, False)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels, False)
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    cfg = tiny_config(root, "run", data=str(data), steps=20, ema=True, dead_code_threshold=0.5)
    train_vqvae(cfg, progress=False)
    return root / "run"


def prior_config(run, **kw) -> PriorConfig:
    base = dict(vqvae=str(run / "checkpoint.pt"), steps=8, batch_size=16, lr=3e-3, channels=16, layers=2,
                eval_samples=0, classifier_steps=30, checkpoint_every=4, device="cpu", out=str(run))
    return PriorConfig(**{**base, **kw})


def tiny_prior(kind: str, vocab: Vocabulary | None, num_codes: int = 12):
    torch.manual_seed(0)
    words = len(vocab) if vocab else 0
    if kind == "pixelcnn":
        model = GatedPixelCNN(num_codes, channels=8, layers=3, vocab_size=words)
    else:
        model = TransformerPrior(num_codes, 20, d_model=16, layers=2, heads=2, vocab_size=words,
                                 prompt_len=vocab.max_len if vocab else 0)
    return model.double().eval()


# ---------------------------------------------------------------- prompts and labels

def test_vocabulary_of_fashion_mnist():
    vocab = Vocabulary(FASHION_MNIST_CLASSES)
    assert vocab.words == ("ankle", "bag", "boot", "coat", "dress", "pullover", "sandal", "shirt", "sneaker",
                           "t-shirt", "top", "trouser")
    assert vocab.max_len == 2 and len(vocab) == 13
    boot, ankle = vocab.ids["boot"], vocab.ids["ankle"]
    assert vocab.tokenize("ankle boot") == [ankle, boot] == vocab.tokenize("  Ankle   BOOT ")
    assert vocab.tokenize("boot") == [boot]
    assert vocab.tokenize("t-shirt/top") == [vocab.ids["t-shirt"], vocab.ids["top"]]
    assert vocab.tokenize("shirt") != vocab.tokenize("t-shirt")
    assert vocab.encode(["boot", "ankle boot"]).tolist() == [[boot, 0], [ankle, boot]]
    assert vocab.class_tokens()[9].tolist() == [ankle, boot]


@pytest.mark.parametrize("prompt, message", [
    ("boots", r"unknown word 'boots'; known words: ankle, bag, boot, coat, .*, trouser$"),
    ("red sneaker hat", r"unknown words 'red', 'hat'; known words: ankle"),
    ("   ", r"--prompt is empty; known words: ankle"),
    ("ankle boot boot", r"has 3 words, at most 2"),
])
def test_vocabulary_rejects_bad_prompts(prompt, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(FASHION_MNIST_CLASSES).tokenize(prompt)


def test_training_prompts_show_each_word_of_a_name():
    vocab = Vocabulary(FASHION_MNIST_CLASSES)
    labels = torch.tensor([9] * 400 + [7] * 50)
    tokens = vocab.training_tokens(labels, torch.Generator().manual_seed(0))
    seen = {tuple(t) for t in tokens[:400].tolist()}
    ankle, boot = vocab.ids["ankle"], vocab.ids["boot"]
    assert seen == {(ankle, boot), (ankle, 0), (boot, 0)}
    assert 150 < sum(t == (ankle, boot) for t in map(tuple, tokens[:400].tolist())) < 250
    assert (tokens[400:] == torch.tensor([vocab.ids["sneaker"], 0])).all()  # one-word names never change


def test_idx_labels_and_class_names(tmp_path):
    images, labels = labelled_images(30)
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:20], False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[20:], False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:20], True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[20:], True)
    s = data_mod.load_data(tmp_path)
    assert s.classes == ("0", "1", "2")  # no classes.txt: the label numbers
    np.testing.assert_array_equal(s.train_labels, labels[:20])
    np.testing.assert_array_equal(s.test_labels, labels[20:])
    (tmp_path / "classes.txt").write_text("wide box\ntall box\ndot\n")
    assert data_mod.load_data(tmp_path).classes == CLASSES
    (tmp_path / "classes.txt").write_text("wide box\ntall box\n")
    with pytest.raises(ValueError, match="labels run from 0 to 2, but there are 2 class names"):
        data_mod.load_data(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[20:28], False)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 10 integer labels"):
        data_mod.load_data(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()  # labels for one split only: the data is unlabelled
    s = data_mod.load_data(tmp_path)
    assert s.train_labels is None and s.test_labels is None and s.classes == () and len(s.train) == 20


def test_class_sub_folders(tmp_path):
    images, labels = labelled_images(40)
    for c, name in enumerate(("bar", "column", "dot")):
        (tmp_path / name).mkdir()
        for i in np.flatnonzero(labels == c):
            Image.fromarray(images[i]).save(tmp_path / name / f"{i:03d}.png")
    s = data_mod.load_data(tmp_path, seed=3)
    assert s.classes == ("bar", "column", "dot") and len(s.train) == 36 and len(s.test) == 4
    # Every image keeps its own label through the held-out split.
    by_bytes = {images[i].tobytes(): labels[i] for i in range(40)}
    for split, split_labels in ((s.train, s.train_labels), (s.test, s.test_labels)):
        assert [by_bytes[img[0].tobytes()] for img in split] == split_labels.tolist()


# ---------------------------------------------------------------- the priors

@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_prior_is_causal(kind, conditional):
    vocab = Vocabulary(CLASSES) if conditional else None
    model = tiny_prior(kind, vocab)
    h, w = 4, 5
    grid = torch.randint(0, 12, (2, h, w))
    tokens = vocab.encode(["wide box", "dot"]) if vocab else None
    base = model(grid, tokens).view(2, 12, -1)
    for p in range(h * w):
        changed = grid.clone().view(2, -1)
        changed[:, p] = (changed[:, p] + 1 + torch.randint(0, 11, (2,))) % 12
        logits = model(changed.view(2, h, w), tokens).view(2, 12, -1)
        # The logits of code q see codes 0..q-1 only: changing code p leaves q <= p unchanged...
        torch.testing.assert_close(logits[..., :p + 1], base[..., :p + 1], rtol=1e-12, atol=1e-12)
        if p + 1 < h * w:  # ...and does reach the next one (its left or upper neighbour)
            assert not torch.allclose(logits[..., p + 1], base[..., p + 1])


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
def test_conditioning_changes_the_logits(kind):
    vocab = Vocabulary(CLASSES)
    model = tiny_prior(kind, vocab)
    grid = torch.randint(0, 12, (1, 4, 5)).expand(3, -1, -1)
    logits = model(grid, vocab.encode(["wide box", "tall box", "dot"]))
    for a, b in ((0, 1), (0, 2), (1, 2)):  # every position, the first one included, hears the prompt
        assert (logits[a] - logits[b]).abs().amax(0).min() > 1e-6, (a, b)
    with pytest.raises(ValueError, match="this prior is conditional"):
        model(grid)
    with pytest.raises(ValueError, match="this prior is unconditional"):
        tiny_prior(kind, None)(grid, vocab.encode(["dot"] * 3))


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
def test_sampling_reproducible_by_seed(kind):
    vocab = Vocabulary(CLASSES)
    model = tiny_prior(kind, vocab).float()
    tokens = vocab.encode(["box", "dot", "tall box"])

    def draw_grids(seed, **kw):
        return model.sample(3, 4, 5, tokens=tokens, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw_grids(0), draw_grids(0))
    assert not torch.equal(draw_grids(0), draw_grids(1))
    # top-k 1 is the argmax at every draw: the seed no longer matters.
    assert torch.equal(draw_grids(0, top_k=1), draw_grids(1, top_k=1))
    with pytest.raises(ValueError, match="temperature must be positive"):
        draw_grids(0, temperature=0.0)


def test_draw_top_k_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    top2 = draw(logits, top_k=2, generator=gen)
    assert set(top2.tolist()) == {2, 3}
    assert abs((top2 == 3).double().mean().item() - 1 / (1 + np.exp(-1))) < 0.03
    cold = draw(logits, temperature=0.05, generator=gen)
    assert (cold == 3).all()


# ---------------------------------------------------------------- training, resume, sampling, measures

@pytest.mark.parametrize("kind", ["pixelcnn", "transformer"])
def test_resume_equals_uninterrupted(labelled_vqvae, tmp_path, kind):
    extra = {} if kind == "pixelcnn" else dict(channels=16, layers=1, heads=2)
    whole = train_prior(prior_config(labelled_vqvae, prior=kind, steps=10, out=str(tmp_path / "whole"), **extra),
                        progress=False)
    train_prior(prior_config(labelled_vqvae, prior=kind, steps=6, out=str(tmp_path / "split"), **extra),
                progress=False)
    torch.manual_seed(123)  # another RNG state before resuming must not matter
    resumed = train_prior(prior_config(labelled_vqvae, prior=kind, steps=10, out=str(tmp_path / "split")),
                          resume=True, progress=False)
    assert resumed["conditional"] and resumed["name"] == f"prior-{kind}"
    for key in ("train_nll", "test_nll", "parameters", "step"):
        assert resumed[key] == whole[key], key
    a = torch.load(tmp_path / "whole" / f"prior-{kind}.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / f"prior-{kind}.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "step_s"} for r in rs]

    assert strip(read_jsonl(tmp_path / "split" / f"prior-{kind}.jsonl")) == \
        strip(read_jsonl(tmp_path / "whole" / f"prior-{kind}.jsonl"))


def test_conditional_prior_end_to_end(labelled_vqvae, tmp_path, capsys):
    out = tmp_path / "e2e"
    rc = main(["prior", "--prior", "transformer", "--vqvae", str(labelled_vqvae / "checkpoint.pt"),
               "--steps", "30", "--batch-size", "16", "--lr", "3e-3", "--channels", "16", "--layers", "2",
               "--heads", "2", "--eval-samples", "6", "--classifier-steps", "40", "--device", "cpu",
               "--threads", "1", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "held-out NLL" in printed and "prompt accuracy" in printed
    (record,) = read_jsonl(out / "prior_metrics.jsonl")
    assert record["conditional"] and record["test_nll"] < record["first_nll"]
    assert set(record["prompt_accuracy_per_class"]) == set(CLASSES)
    per_class = list(record["prompt_accuracy_per_class"].values())
    assert all(0 <= a <= 1 for a in per_class) and record["prompt_accuracy"] == pytest.approx(np.mean(per_class))
    assert 0 < record["ceiling"] <= 1 and (out / "classifier.pt").is_file()
    ceilings = record["ceiling_per_class"]  # the test set has about 20 images per class
    assert set(ceilings) == set(CLASSES) and all(0 <= a <= 1 for a in ceilings.values())
    with Image.open(out / "prior-transformer-prompts.png") as im:  # 6 samples for each of 3 classes
        assert im.size == grid_size(18, 6, 28, 28)
    # The cached classifier is reused: same ceiling without retraining it.
    mtime = (out / "classifier.pt").stat().st_mtime_ns
    again = train_prior(prior_config(labelled_vqvae, prior="transformer", steps=30, eval_samples=6,
                                     classifier_steps=40, out=str(out)), resume=True, progress=False)
    assert (out / "classifier.pt").stat().st_mtime_ns == mtime and again["ceiling"] == record["ceiling"]
    assert again["test_nll"] == record["test_nll"] and len(read_jsonl(out / "prior_metrics.jsonl")) == 2

    # Sampling: --prompt all is one row per class, and the same seed draws the same picture.
    args = ["sample", "--prior", "transformer", "--out", str(out), "--columns", "4", "--device", "cpu"]
    assert main(args + ["--prompt", "all", "--png", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--prompt", "all", "--png", str(tmp_path / "b.png"), "--temperature", "1.0"]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == grid_size(12, 4, 28, 28)
    assert main(args + ["--prompt", "box", "-n", "5", "--top-k", "3", "--png", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == grid_size(5, 4, 28, 28)
    capsys.readouterr()
    assert main(args + ["--prompt", "boxes", "--png", str(tmp_path / "d.png")]) == 2
    assert "unknown word 'boxes'; known words: box, dot, tall, wide" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_unlabelled_data_trains_an_unconditional_prior(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "u", steps=10)  # a .npy array: no labels
    train_vqvae(cfg, progress=False)
    run = tmp_path / "u"
    r = train_prior(prior_config(run, steps=5, eval_samples=4), progress=False)
    assert not r["conditional"] and r["name"] == "prior-pixelcnn-uncond" and "prompt_accuracy" not in r
    assert resolve_prior(run, "pixelcnn") == run / "prior-pixelcnn-uncond.pt"
    png = sample_images(resolve_prior(run, "pixelcnn"), tmp_path / "s.png", n=4, columns=2, device="cpu")
    with Image.open(png) as im:
        assert im.size == grid_size(4, 2, 28, 28)
    with pytest.raises(ValueError, match="is an unconditional prior"):
        sample_images(resolve_prior(run, "pixelcnn"), tmp_path / "t.png", prompt="dot", device="cpu")
    with pytest.raises(ValueError, match="--eval-samples must be >= 0"):
        train_prior(prior_config(run, steps=5, eval_samples=-1), progress=False)
    with pytest.raises(ValueError, match="a conditional prior needs labels"):
        train_prior(prior_config(run, steps=5, conditional=True), progress=False)
    assert json.loads((run / "prior_metrics.jsonl").read_text().splitlines()[0])["conditional"] is False
