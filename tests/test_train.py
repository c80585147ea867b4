"""Training script: loaders, stage-1 training, --compare, --resume, prior and sampling.

Small model (hidden 16, K 32, D 8) on a few hundred synthetic 28 x 28 images,
a few steps on CPU, so that the whole file stays within a few seconds.
"""
import gzip
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqkern.train import data as data_mod
from vqkern.train.cli import main
from vqkern.train.compare import compare_quantizers
from vqkern.train.outputs import grid_size, read_jsonl
from vqkern.train.prior import GatedPixelCNN
from vqkern.train.stage1 import VQVAEConfig, train_vqvae
from vqkern.train.stage2 import PriorConfig, sample_images, train_prior


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are too small to gain from a second thread, and on a busy 2-core
    # machine intra-op threads wait on each other: a 16-channel conv forward+backward
    # took 15 ms with 2 threads against 3 ms with 1 while the other tests ran.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28): bright rectangles of random size and place on a dark ground."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    for img in out:
        y, x = rng.integers(0, 14, 2)
        h, w = rng.integers(6, 14, 2)
        img[y:y + h, x:x + w] = rng.integers(128, 256)
    return out


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def tiny_config(tmp_path, name, **kw) -> VQVAEConfig:
    npy = tmp_path / "images.npy"
    if not npy.exists():
        np.save(npy, synthetic_images(300))
    base = dict(data=str(npy), eval_images=0, steps=20, batch_size=16, num_embeddings=32, embedding_dim=8,
                hidden=16, res_hidden=8, res_blocks=1, lr=3e-3, decay=0.9, device="cpu", out=str(tmp_path / name),
                codebook="loss", dead_code_threshold=0.0)
    return VQVAEConfig(**{**base, **kw})


# ---------------------------------------------------------------- loaders

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_folder(tmp_path, compress):
    train, test = synthetic_images(20, 1), synthetic_images(7, 2)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(20) % 10, compress)
    splits = data_mod.load_data(tmp_path)
    np.testing.assert_array_equal(splits.train, train[:, None])
    np.testing.assert_array_equal(splits.test, test[:, None])


def test_npy_layouts(tmp_path):
    imgs = synthetic_images(30, 3)
    np.save(tmp_path / "a.npy", imgs)
    np.save(tmp_path / "b.npy", imgs[..., None].astype(np.float32) / 255)  # (N, H, W, 1) float
    a, b = data_mod.load_data(tmp_path / "a.npy"), data_mod.load_data(tmp_path / "b.npy")
    assert a.train.shape == (27, 1, 28, 28) and a.test.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(a.train, b.train)
    # train and held-out images partition the set
    assert sorted(map(bytes, np.concatenate([a.train, a.test]))) == sorted(map(bytes, imgs[:, None]))


def test_image_folder(tmp_path):
    imgs = synthetic_images(10, 4)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    splits = data_mod.load_data(tmp_path)
    assert splits.train.shape == (9, 1, 28, 28)
    assert sorted(map(bytes, np.concatenate([splits.train, splits.test]))) == sorted(map(bytes, imgs[:, None]))
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.stack([imgs[0]] * 3, -1)).save(rgb / "x.jpg")
    Image.fromarray(imgs[1]).save(rgb / "y.png")
    assert data_mod.read_image_folder(rgb).shape == (2, 3, 28, 28)


def test_malformed_files(tmp_path):
    good = synthetic_images(5)
    write_idx(tmp_path / "t.idx3", good, False)
    raw = (tmp_path / "t.idx3").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"trunc: IDX file of shape \(5, 28, 28\) should be"):
        data_mod.read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="magic: not an IDX file"):
        data_mod.read_idx(tmp_path / "magic")
    (tmp_path / "badgz").write_bytes(gzip.compress(raw)[:40])
    with pytest.raises(ValueError, match="badgz: corrupt gzip stream"):
        data_mod.read_idx(tmp_path / "badgz")
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=r"bad.npy: not a readable .npy array"):
        data_mod.load_data(tmp_path / "bad.npy")
    np.save(tmp_path / "flat.npy", np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match=r"must have shape \(N, H, W\)"):
        data_mod.load_data(tmp_path / "flat.npy")
    np.save(tmp_path / "range.npy", np.full((4, 28, 28), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        data_mod.load_data(tmp_path / "range.npy")
    broken = tmp_path / "imgs"
    broken.mkdir()
    Image.fromarray(good[0]).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="b.png: not a readable image"):
        data_mod.load_data(broken)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.fromarray(good[0]).save(sizes / "a.png")
    Image.fromarray(good[0][:20]).save(sizes / "b.png")
    with pytest.raises(ValueError, match="must share one size"):
        data_mod.load_data(sizes)


def test_missing_default_data_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "DEFAULT_DATA", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data_mod.load_data()
    assert main(["vqvae", "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# ---------------------------------------------------------------- stage 1

def test_loss_decreases_and_outputs(tmp_path):
    # Dead-code re-seeding keeps the codebook in use (without it this run collapses to 1 code).
    cfg = tiny_config(tmp_path, "run", steps=80, ema=True, dead_code_threshold=0.5)
    final = train_vqvae(cfg, progress=False)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 81))
    first, last = np.mean([r["recon"] for r in recs[:5]]), np.mean([r["recon"] for r in recs[-5:]])
    assert last < 0.5 * first, (first, last)
    # Held-out error is well under that of predicting the mean pixel (the variance; 0.062).
    pixels = np.load(tmp_path / "images.npy") / 255.0
    assert final["test_recon"] < 0.6 * np.var(pixels)
    assert 4.0 <= final["test_perplexity"] <= 32 and 4 <= final["codes_used"] <= 32
    for key in ("reconstructions_png", "curves_png", "usage_png"):
        with Image.open(final[key]) as im:
            assert im.size[0] > 50
    with Image.open(final["reconstructions_png"]) as im:  # 30 held-out images + their reconstructions, 8 columns
        assert im.size == grid_size(60, 8, 28, 28)


@pytest.mark.parametrize("ema", [False, True], ids=["grad", "ema"])
def test_compare_curves_agree(tmp_path, ema):
    # Same weights, batches and RNG; the quantizers differ only in arithmetic: the
    # reference takes distances in fp64, vqkern in fp32 (identical argmin away from
    # near-ties, and these 16*49 rows against 32 codes have none at this scale), and
    # both losses are fp32 means of the same squares summed in different orders
    # (relative error ~ 1e-7 * sqrt(N*D) < 1e-5). Adam turns a relative gradient
    # difference of that size into an equally small weight difference per step, so
    # after 15 steps the curves agree to 1e-4 relative (observed: 1e-7, one fp32 ulp);
    # a wrong gradient, a wrong EMA statistic or a different code choice moves the
    # loss by percents.
    cfg = tiny_config(tmp_path, "cmp", steps=15, ema=ema)
    r = compare_quantizers(cfg, progress=False)
    ref, vqk = r["curves"]["reference"], r["curves"]["vqkern"]
    for a, b in zip(ref, vqk):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["recon"] == pytest.approx(a["recon"], rel=1e-4, abs=1e-6)
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-4)
    assert ref[-1]["recon"] < ref[0]["recon"]
    assert r["max_abs_diff"]["loss"] == max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, vqk))
    assert r["reference"]["ms_per_step"] > 0 and r["vqkern"]["ms_per_step"] > 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert len(read_jsonl(tmp_path / "cmp" / "compare.jsonl")) == 30


def test_resume_equals_uninterrupted(tmp_path):
    # EMA with dead-code re-seeding draws from the global RNG, so this also checks its restore.
    kw = dict(ema=True, dead_code_threshold=2.0, checkpoint_every=4)
    whole = train_vqvae(tiny_config(tmp_path, "whole", steps=10, **kw), progress=False)
    train_vqvae(tiny_config(tmp_path, "split", steps=6, **kw), progress=False)
    torch.manual_seed(123)  # a different RNG state before resuming must not matter
    resumed = train_vqvae(tiny_config(tmp_path, "split", steps=10, **kw), resume=True, progress=False)
    for key in ("test_recon", "test_perplexity", "codes_used", "final_loss"):
        assert resumed[key] == whole[key], key

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "step_s")} for r in rs]

    assert strip(read_jsonl(tmp_path / "split" / "metrics.jsonl")) == \
        strip(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))


# ---------------------------------------------------------------- stage 2

def test_pixelcnn_is_causal():
    torch.manual_seed(0)
    model = GatedPixelCNN(10, channels=8, layers=3).double()
    h = w = 5
    emb = model.embed(torch.randint(0, 10, (1, h, w))).permute(0, 3, 1, 2).detach().requires_grad_()

    def run(x):
        v = hh = x
        for layer in model.layers:
            v, hh = layer(v, hh)
        return model.head(hh)

    for i in range(h):
        for j in range(w):
            (g,) = torch.autograd.grad(run(emb)[0, :, i, j].sum(), emb)
            seen = g[0].abs().sum(0) > 0
            before = torch.tensor([[(a, b) < (i, j) for b in range(w)] for a in range(h)])
            assert torch.equal(seen, before), (i, j)  # every earlier position, nothing later


def test_prior_trains_and_sample_writes_png(tmp_path):
    cfg = tiny_config(tmp_path, "s", steps=20, ema=True, dead_code_threshold=0.5)
    train_vqvae(cfg, progress=False)
    pcfg = PriorConfig(vqvae=str(tmp_path / "s" / "checkpoint.pt"), steps=40, batch_size=32, lr=3e-3,
                       channels=16, layers=3, device="cpu", out=str(tmp_path / "s"))
    result = train_prior(pcfg, progress=False)
    assert result["grid"] == [7, 7]
    # Training reached below the uniform prior over 32 codes and below its own start.
    assert result["train_nll"] < min(math.log(32), result["first_nll"])
    # A .npy array has no labels: the prior is unconditional.
    assert not result["conditional"] and result["prior_checkpoint"].endswith("prior-pixelcnn-uncond.pt")
    png = sample_images(result["prior_checkpoint"], tmp_path / "samples.png", n=6, columns=3, device="cpu")
    with Image.open(png) as im:
        assert im.size == grid_size(6, 3, 28, 28) and im.mode == "L"
    # The command line writes the same picture from the same seed.
    assert main(["sample", "--out", str(tmp_path / "s"), "-n", "6", "--columns", "3", "--device", "cpu",
                 "--png", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes() == png.read_bytes()


def test_cli_vqvae_prints_summary(tmp_path, capsys):
    np.save(tmp_path / "x.npy", synthetic_images(100))
    rc = main(["vqvae", "--data", str(tmp_path / "x.npy"), "--steps", "3", "--batch-size", "8", "-K", "16", "-D", "4",
               "--hidden", "8", "--res-hidden", "4", "--res-blocks", "1", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out reconstruction MSE" in out and "ms/step" in out
    assert json.loads((tmp_path / "o" / "final.json").read_text())["step"] == 3


# ---------------------------------------------------------------- codebook recipes

def test_default_recipe_and_the_papers_codebook_one_flag_away():
    from vqkern.train.cli import _vqvae_config, build_parser
    from vqkern.train.stage1 import DEAD_CODE_DEFAULT, DEFAULT_CODEBOOK

    def parse(*a):
        return _vqvae_config(build_parser().parse_args(["vqvae", *a]))

    default = parse()
    assert default.codebook == DEFAULT_CODEBOOK and default.dead_code_threshold == DEAD_CODE_DEFAULT[DEFAULT_CODEBOOK]
    plain = parse("--codebook", "loss")
    assert not plain.ema and plain.dead_code_threshold == 0.0
    demo = parse("--ema", "--dead-code-threshold", "1")  # the Makefile's demo flags
    assert demo.ema and demo.codebook == "ema" and demo.dead_code_threshold == 1.0
    big = parse("--codebook", "simvq", "--codebook-dim", "8", "--metric", "cosine", "--init", "kmeans")
    assert (big.codebook, big.codebook_dim, big.metric, big.init, big.dead_code_threshold) == ("simvq", 8, "cosine",
                                                                                               "kmeans", 0.0)


def test_checkpoints_from_before_codebook_recipes_keep_their_recipe():
    from vqkern.train.stage1 import config_from_checkpoint

    old = {"ema": False, "dead_code_threshold": 0.0, "num_embeddings": 64}
    assert config_from_checkpoint(old).codebook == "loss"
    assert config_from_checkpoint({**old, "ema": True}).codebook == "ema"


def test_progress_bar_spans_the_whole_run(tmp_path, monkeypatch):
    import tqdm

    bars = []

    class Recording(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    train_vqvae(tiny_config(tmp_path, "bar", steps=7, checkpoint_every=3), progress=True)
    # one bar across the three stretches between checkpoints, so its clock starts with the run
    assert len(bars) == 1 and bars[0].n == 7 and bars[0].total == 7


def test_large_codebook_options_train_and_resume(tmp_path):
    kw = dict(codebook="simvq", codebook_dim=4, metric="cosine", init="kmeans", kmeans_iters=2, kmeans_batches=2,
              checkpoint_every=4, num_embeddings=48)
    whole = train_vqvae(tiny_config(tmp_path, "whole", steps=9, **kw), progress=False)
    train_vqvae(tiny_config(tmp_path, "split", steps=4, **kw), progress=False)
    resumed = train_vqvae(tiny_config(tmp_path, "split", steps=9, **kw), resume=True, progress=False)
    for key in ("test_recon", "test_perplexity", "codes_used", "final_loss"):
        assert resumed[key] == whole[key], key
    from vqkern.train.stage1 import load_vqvae

    model, _ = load_vqvae(tmp_path / "whole" / "checkpoint.pt")
    x = torch.rand(2, 1, 28, 28) - 0.5
    recon, idx, _, _ = model(x)
    torch.testing.assert_close(model.decode_indices(idx), recon)
