import numpy as np
import pytest

from mpsclip.metrics import chance_r_mean, retrieval_metrics


def test_perfect_similarity_gives_100():
    sim = np.eye(3).repeat(2, axis=1)  # image i owns texts 2i, 2i+1
    out = retrieval_metrics(sim, [0, 0, 1, 1, 2, 2], [[0, 1], [2, 3], [4, 5]])
    assert all(v == 100.0 for v in out.values())


def test_constructed_ranks():
    # 2 images, 4 texts; image 0 owns texts 0,1; image 1 owns 2,3
    sim = np.array(
        [
            [0.1, 0.9, 0.5, 0.4],  # image 0: best own caption (text 1) at rank 0
            [0.8, 0.7, 0.6, 0.1],  # image 1: own captions at ranks 2 and 3 -> best 2
        ]
    )
    out = retrieval_metrics(sim, [0, 0, 1, 1], [[0, 1], [2, 3]])
    assert out["txt_r1"] == 50.0 and out["txt_r5"] == 100.0
    # texts: t0 -> img1 first (rank 1); t1 -> img0 (0); t2 -> img1 (0); t3 -> img0 first (1)
    assert out["img_r1"] == 50.0 and out["img_r5"] == 100.0
    assert out["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(np.zeros((2, 3)), [0, 1], [[0], [1]])


def test_chance_level_matches_random_scores():
    rng = np.random.default_rng(0)
    n, c = 20, 5
    txt2img = [i for i in range(n) for _ in range(c)]
    img2txt = [list(range(i * c, i * c + c)) for i in range(n)]
    means = [retrieval_metrics(rng.standard_normal((n, n * c)), txt2img, img2txt)["r_mean"] for _ in range(200)]
    assert np.mean(means) == pytest.approx(chance_r_mean(n, c), rel=0.08)
