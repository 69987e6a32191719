"""Stain augmentation (HED jitter) and stain normalisation (Macenko, Reinhard via torchstain),
checked against the definitions of skimage's rgb2hed/hed2rgb and of the papers."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graftkd.data.datasets import FileDataset
from graftkd.data.stain import IO, StainNormalizer, fit_normalizer
from graftkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, HEDJitter, eval_transform, hed_jitter, train_transform
from graftkd.data.types import Record

# skimage.color (Ruifrok & Johnston): rgb_from_hed and rgb2hed / hed2rgb as Tellez et al. used them
# (skimage < 0.19: stains = -log(rgb) @ hed_from_rgb, rgb = exp(-stains @ rgb_from_hed)), in float64
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def skimage_jitter(img: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """HWC uint8 -> rgb2hed (without its clip at 0) -> alpha * s + beta -> hed2rgb -> uint8."""
    rgb = np.maximum(img / 255.0, 1e-6)
    stains = -np.log(rgb) @ np.linalg.inv(RGB_FROM_HED)
    stains = stains * alpha + beta
    out = np.clip(np.exp(-stains @ RGB_FROM_HED), 0, 1)
    return np.round(out * 255).astype(np.uint8)


def _image(seed: int, h: int = 24, w: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_hed_jitter_without_jitter_is_the_identity(seed):
    img = _image(seed)
    assert torch.equal(hed_jitter(img, torch.ones(3), torch.zeros(3)), img)


def test_hed_jitter_follows_skimage_definitions():
    img = _image(1, 40, 40)
    alpha, beta = np.array([1.05, 0.92, 1.1]), np.array([0.02, -0.03, 0.01])
    ours = hed_jitter(img, torch.tensor(alpha, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32))
    ref = skimage_jitter(img.permute(1, 2, 0).numpy(), alpha, beta)
    diff = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 vs float64 rounding of a few pixels
    assert not torch.equal(ours, img)


def test_hed_jitter_batched_equals_one_by_one():
    imgs = torch.stack([_image(s) for s in range(4)])
    alpha = torch.tensor([[1.0, 1.1, 0.9], [0.95, 1.0, 1.0], [1.05, 0.9, 1.0], [1.0, 1.0, 1.2]])
    beta = torch.tensor([[0.0, 0.02, 0.0], [-0.01, 0.0, 0.03], [0.0, 0.0, 0.0], [0.05, -0.05, 0.0]])
    batched = hed_jitter(imgs, alpha, beta)
    for k in range(4):
        assert torch.equal(batched[k], hed_jitter(imgs[k], alpha[k], beta[k]))


def test_stain_jitter_views_replay_exactly(tmp_path):
    from torchvision.io import write_png

    path = tmp_path / "a.png"
    write_png(_image(3, 40, 40), str(path))
    aug = train_transform("histology_stain", 32, IMAGENET_MEAN, IMAGENET_STD, 0.2, 0.1)
    assert any(isinstance(t, HEDJitter) for t in aug.transforms)
    ds = FileDataset([Record(str(path), 0, "g")], aug, eval_transform(32, IMAGENET_MEAN, IMAGENET_STD), seed=5,
                     side=36)
    torch.manual_seed(123)
    a = ds.load_view(0, 2)
    torch.manual_seed(456)  # the caller's RNG does not matter
    assert torch.equal(ds.load_view(0, 2), a)
    assert not torch.equal(ds.load_view(0, 3), a)


# ------------------------------------------------------------------------------ normalisation
H = np.array([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11])


def compose(h_vec: np.ndarray, e_vec: np.ndarray, seed: int, n: int = 64, scale: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """A two-stain image by Beer-Lambert: ``I = Io exp(-(c_h h + c_e e))`` with unit stain vectors and
    seeded concentrations; returns the uint8 image and the concentrations [2, n*n]."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.gamma(2.0, 0.35, n * n), rng.gamma(2.0, 0.3, n * n)]) * scale
    hv, ev = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    od = np.outer(hv, c[0]) + np.outer(ev, c[1])
    img = np.clip(np.round(IO * np.exp(-od) - 1), 0, 255).astype(np.uint8).reshape(3, n, n)
    return torch.from_numpy(img), c


def test_macenko_recovers_the_stain_vectors_and_percentiles_of_its_reference():
    img, c = compose(H, E, 0)
    norm = fit_normalizer("macenko", [img], {"test": True})
    he = np.array(norm.params["stain_matrix"])
    for k, v in enumerate((H, E)):  # Macenko 2009: the stain vectors are the extreme angles of the OD plane
        cos = he[:, k] @ v / np.linalg.norm(v) / np.linalg.norm(he[:, k])
        assert cos > 0.995, (k, cos)
    tissue = ((-np.log((img.reshape(3, -1).numpy().astype(float) + 1) / IO)) >= 0.15).all(0)
    max_c = np.percentile(c[:, tissue], 99, axis=1)
    assert np.allclose(norm.params["max_concentrations"], max_c, rtol=0.08)


def test_macenko_maps_another_centres_stain_onto_the_reference():
    ref, _ = compose(H, E, 0)
    other_h, other_e = H * np.array([1.3, 0.8, 1.0]), E * np.array([0.8, 1.0, 1.4])
    src, _ = compose(other_h, other_e, 1, scale=1.3)
    same_tissue_ref_stain, _ = compose(H, E, 1)
    norm = fit_normalizer("macenko", [ref], {})
    out = norm(src)
    assert out.dtype == torch.uint8 and out.shape == src.shape
    before = (src.float() - same_tissue_ref_stain.float()).abs().mean()
    after = (out.float() - same_tissue_ref_stain.float()).abs().mean()
    assert after < 0.25 * before and after < 6, (before, after)


def test_reinhard_matches_the_reference_lab_mean_and_sd():
    from graftkd.data.stain import rgb2lab

    ref, _ = compose(H, E, 0)
    src, _ = compose(H * np.array([1.4, 0.7, 1.0]), E, 2, scale=0.7)
    norm = fit_normalizer("reinhard", [ref], {})

    def stats(img):
        lab = rgb2lab(img.float() / 255)
        return lab.reshape(3, -1).mean(1), lab.reshape(3, -1).std(1)

    (m_ref, s_ref), (m_out, s_out), (m_src, _) = stats(ref), stats(norm(src)), stats(src)
    assert (m_out - m_ref).abs().max() < 2.0 < (m_src - m_ref).abs().max()  # OpenCV-scaled LAB units (0..255)
    assert ((s_out - s_ref).abs() / s_ref).max() < 0.1


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_described_normaliser_normalises_the_same(method):
    ref, _ = compose(H, E, 0, n=32)
    src, _ = compose(H * 1.2, E * 0.9, 3, n=32)
    norm = fit_normalizer(method, [ref], {"reference": "x.png"})
    again = StainNormalizer.from_description(norm.describe())
    assert torch.equal(again(src), norm(src)) and again.fingerprint() == norm.fingerprint()


def test_macenko_keeps_an_image_without_tissue():
    ref, _ = compose(H, E, 0, n=32)
    blank = torch.full((3, 16, 16), 250, dtype=torch.uint8)
    assert torch.equal(fit_normalizer("macenko", [ref], {})(blank), blank)
