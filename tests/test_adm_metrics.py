"""ADM's metrics against independent float64 numpy implementations and analytic cases; the evaluate CLI.

The references here are written from the definitions (guided-diffusion evaluations/evaluator.py), in another
form than dyngen's: IS as exp(H(mean p) - mean H(p)) per split, precision / recall from the full float64
distance matrix and a sort, FID with scipy's sqrtm as ADM computes it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from dyngen import evaluation
from dyngen.evaluation import adm_metrics
from tests import test_inception


def softmax64(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def entropy(p):
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def inception_score_reference(logits, split_size):
  # KL(p || m) averaged over the split = H(m) - mean H(p), m the split's marginal.
  p = softmax64(logits)
  splits = [p[i:i + split_size] for i in range(0, len(p), split_size)]
  return float(np.mean([np.exp(entropy(s.mean(axis=0)) - entropy(s).mean()) for s in splits]))


def precision_recall_reference(reference, samples, k=3):
  def distances(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

  radii_reference = np.sort(distances(reference, reference), axis=1)[:, k]
  radii_samples = np.sort(distances(samples, samples), axis=1)[:, k]
  cross = distances(samples, reference)
  precision = np.mean((cross <= radii_reference[None, :]).any(axis=1))
  recall = np.mean((cross <= radii_samples[:, None]).any(axis=0))
  return precision, recall


def adm_frechet_reference(mu1, sigma1, mu2, sigma2):
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  assert np.isfinite(covmean).all() and np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_inception_score_matches_reference_and_analytic_cases():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(23, 10))
  # Splits of 10, 10 and 3 rows (ADM cuts consecutive splits of split_size; the short last one counts).
  assert adm_metrics.inception_score(logits, split_size=10) == pytest.approx(
      inception_score_reference(logits, 10), rel=1e-12)
  assert adm_metrics.inception_score(logits) == pytest.approx(inception_score_reference(logits, 23), rel=1e-12)
  # Uniform predictions: p(y|x) = p(y), IS 1.
  assert adm_metrics.inception_score(np.zeros((12, 1008)), split_size=5) == pytest.approx(1.0, abs=1e-12)
  # Confident, distinct classes within each split: IS = the split size (probabilities underflow to 0).
  one_hot = 1000.0 * np.eye(1008)[np.arange(12) % 6]
  assert adm_metrics.inception_score(one_hot, split_size=6) == pytest.approx(6.0, rel=1e-12)
  # All samples of one class: IS 1 however confident.
  assert adm_metrics.inception_score(one_hot[:1].repeat(8, axis=0)) == pytest.approx(1.0, abs=1e-12)


def test_fid_matches_adm_sqrtm_form():
  rng = np.random.default_rng(1)
  features_a = rng.normal(size=(300, 32)) @ (np.eye(32) + 0.3 * rng.normal(size=(32, 32)))
  features_b = rng.normal(size=(400, 32)) + rng.normal(0.5, 0.2, 32)
  stats_a = evaluation.feature_statistics(features_a)
  stats_b = evaluation.feature_statistics(features_b)
  # Both are the same float64 formula up to how tr sqrt(S1 S2) is found: agreement to ~1e-10 relative.
  assert evaluation.frechet_distance(*stats_a, *stats_b) == pytest.approx(
      adm_frechet_reference(*stats_a, *stats_b), rel=1e-9)
  assert evaluation.frechet_distance(*stats_a, *stats_a) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_match_reference_in_float32():
  rng = np.random.default_rng(2)
  reference = rng.normal(size=(70, 16)).astype(np.float32)
  samples = (rng.normal(size=(50, 16)) * 1.3 + 0.4).astype(np.float32)
  expected = precision_recall_reference(reference, samples)
  assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95  # a case where both can be wrong
  # Gaussian data has no distances within float32 round-off (1e-6) of a radius: the fractions are equal,
  # for any blocking (blocks of 16 exercise the running k-nearest merge and the partial last blocks).
  for batch_size in (16, 10000):
    assert adm_metrics.precision_recall(reference, samples, batch_size=batch_size, dtype="float32") == expected
  radii = adm_metrics.manifold_radii(reference, batch_size=16, dtype="float32")
  full = ((reference[:, None].astype(np.float64) - reference[None]) ** 2).sum(-1)
  np.testing.assert_allclose(radii, np.sort(full, axis=1)[:, 3], rtol=1e-5)


def test_precision_recall_float16_distances_and_fallback():
  rng = np.random.default_rng(3)
  reference = rng.normal(size=(60, 16)).astype(np.float32)
  samples = (rng.normal(size=(40, 16)) + 0.3).astype(np.float32)
  # ADM's default: float16 distances (relative rounding 2^-11), which may move a borderline point.
  distances = np.asarray(adm_metrics.pairwise_squared_distances(reference, samples))
  np.testing.assert_array_equal(distances, distances.astype(np.float16).astype(np.float32))
  precision, recall = adm_metrics.precision_recall(reference, samples)
  expected = precision_recall_reference(reference, samples)
  assert abs(precision - expected[0]) <= 2 / 40 and abs(recall - expected[1]) <= 2 / 60
  # |x|² above float16's 65504 overflows: the block is recomputed in float32, giving the float32 answer.
  far = 200.0 * reference
  far_distances = np.asarray(adm_metrics.pairwise_squared_distances(far, far[:5]))
  assert np.isfinite(far_distances).all() and far_distances.max() > 65504
  assert adm_metrics.precision_recall(far, 200.0 * samples) == precision_recall_reference(far, 200.0 * samples)


def test_precision_recall_analytic_cases():
  rng = np.random.default_rng(4)
  points = rng.normal(size=(30, 8)).astype(np.float32)
  # Identical sets: every point lies in its own ball (distance 0 <= radius).
  assert adm_metrics.precision_recall(points, points) == (1.0, 1.0)
  # Far apart: no sample in any reference ball and back.
  assert adm_metrics.precision_recall(points, points + 100.0) == (0.0, 0.0)
  # Mode collapse: samples that repeat 4 reference points are all "precise" but recall few references.
  collapsed = np.repeat(points[:4], 5, axis=0) + 1e-3 * rng.normal(size=(20, 8)).astype(np.float32)
  precision, recall = adm_metrics.precision_recall(points, collapsed, dtype="float32")
  assert precision == 1.0 and recall < 0.5


def test_adm_metrics_combines_them():
  rng = np.random.default_rng(5)
  features = {"pool_3": rng.normal(size=(40, 6)), "spatial": rng.normal(size=(40, 5)),
              "logits": rng.normal(size=(40, 9))}
  reference = {"pool_3": rng.normal(size=(30, 6)) + 0.2, "spatial": rng.normal(size=(30, 5))}
  metrics = adm_metrics.compute_metrics(features, reference, distance_dtype="float32")
  expected_fid = adm_frechet_reference(*evaluation.feature_statistics(features["pool_3"]),
                                       *evaluation.feature_statistics(reference["pool_3"]))
  assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-9)
  assert metrics["sfid"] == pytest.approx(adm_frechet_reference(
      *evaluation.feature_statistics(features["spatial"]), *evaluation.feature_statistics(reference["spatial"])),
                                          rel=1e-9)
  assert metrics["inception_score"] == pytest.approx(inception_score_reference(features["logits"], 5000))
  assert (metrics["precision"], metrics["recall"]) == precision_recall_reference(reference["pool_3"],
                                                                                 features["pool_3"])
  # Stored statistics win over the features (ADM reads mu / sigma from the reference npz when present).
  stored = dict(reference, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(5), sigma_s=np.eye(5))
  fid = adm_metrics.compute_metrics(features, stored)["fid"]
  assert fid == pytest.approx(adm_frechet_reference(*evaluation.feature_statistics(features["pool_3"]),
                                                    np.zeros(6), np.eye(6)), rel=1e-9)
  with pytest.raises(ValueError, match="neither mu_s/sigma_s nor spatial"):
    adm_metrics.compute_metrics(features, {"pool_3": reference["pool_3"]})


# ---------------------------------------------------------------------------------------------------------
# python -m dyngen.evaluate, end to end in subprocesses, with random Inception weights in the real file format.

REPO_ROOT = test_inception.CASE.parents[2]


def run_evaluate(*args, cache_dir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if cache_dir:  # the two runs compile the same Inception program: the second reads it from this cache
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, "-m", "dyngen.evaluate", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  return test_inception.random_inception_file(tmp_path_factory.mktemp("weights") / "pt_inception.pth", seed=1)


@pytest.mark.slow  # ~25 s on a quiet 2-core CPU, most of it the 2048-d float64 Fréchet distances
def test_evaluate_cli_end_to_end(tmp_path, inception_file):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, size=(6, 32, 32, 3)).astype(np.uint8)
  for i, image in enumerate(images):  # two class folders; 32x32 PNGs, which the 32 centre crop keeps as they are
    (tmp_path / "folder" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(tmp_path / "folder" / f"class_{i % 2}" / f"{i}.png")
  made = run_evaluate(f"--make_reference={tmp_path / 'reference.npz'}", f"--images={tmp_path / 'folder'}",
                      "--image_size=32", f"--inception={inception_file}", "--batch_size=3",
                      cache_dir=tmp_path / "cache")
  assert made.returncode == 0, made.stderr
  reference = np.load(tmp_path / "reference.npz")
  assert sorted(reference.files) == ["arr_0", "arr_1", "mu", "mu_s", "sigma", "sigma_s"]
  assert reference["mu"].shape == (2048,) and reference["sigma_s"].shape == (2023, 2023)
  order = [0, 2, 4, 1, 3, 5]  # sorted paths: class_0/0, 2, 4, then class_1/1, 3, 5
  np.testing.assert_array_equal(reference["arr_0"], images[order])
  np.testing.assert_array_equal(reference["arr_1"], [0, 0, 0, 1, 1, 1])
  # The samples are the reference images themselves: FID = sFID = 0 (round-off), precision = recall = 1.
  np.savez(tmp_path / "samples.npz", arr_0=images)
  result = run_evaluate(f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'reference.npz'}",
                        f"--inception={inception_file}", f"--output={tmp_path / 'metrics.json'}",
                        "--batch_size=3", "--progress_every_s=0", cache_dir=tmp_path / "cache")
  assert result.returncode == 0, result.stderr
  assert "images/s, ETA" in result.stdout and "| FID |" in result.stdout
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["fid"] == pytest.approx(0.0, abs=1e-6) and metrics["sfid"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
  assert 1.0 <= metrics["inception_score"] < 6.0 and metrics["num_samples"] == metrics["num_reference"] == 6


def test_evaluate_cli_user_errors(tmp_path, inception_file, state_dict_without_one_tensor):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  np.savez(tmp_path / "samples.npz", arr_0=images)
  np.savez(tmp_path / "no_images.npz", images=images)
  test_inception.write_state_dict(tmp_path / "wrong.pth", state_dict_without_one_tensor)
  cases = [
      ([f"--samples={tmp_path / 'absent.npz'}", f"--reference={tmp_path / 'samples.npz'}"], "absent.npz: no such file"),
      ([f"--samples={tmp_path / 'no_images.npz'}", f"--reference={tmp_path / 'samples.npz'}"],
       "has no array 'arr_0' (it holds ['images'])"),
      ([f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'samples.npz'}",
        f"--inception={tmp_path / 'wrong.pth'}"], "missing in the checkpoint (1)"),
  ]
  for args, message in cases:
    if not any(a.startswith("--inception") for a in args):
      args = args + [f"--inception={inception_file}"]
    result = run_evaluate(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def state_dict_without_one_tensor():
  import collections  # pylint: disable=g-import-not-at-top
  manifest = json.loads((test_inception.CASE / "manifest.json").read_text())
  state_dict = collections.OrderedDict(test_inception.regenerate_state_dict(manifest, seed=2))
  del state_dict["Mixed_7c.branch_pool.conv.weight"]
  return state_dict


# ---------------------------------------------------------------------------------------------------------
# The evaluator registry (dyngen.evaluation.evaluators).

def test_evaluator_registry_and_reference_checks(tmp_path):
  from dyngen.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  assert {"adm_fid", "digits"} <= set(evaluators.REGISTRY)
  with pytest.raises(ValueError, match=r"unknown evaluator 'fid'; registered: \['adm_fid', 'digits'\]"):
    evaluators.build("fid")
  with pytest.raises(ValueError, match="registered twice"):
    evaluators.register("digits")(type("Other", (), {}))
  statistics = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  # Checked before the weights are read (the weight path does not exist).
  with pytest.raises(ValueError, match="no arr_0 images .* needed for precision / recall"):
    evaluators.build("adm_fid", reference=statistics, inception=tmp_path / "absent.pth")
  with pytest.raises(FileNotFoundError, match="reference batch .* not found"):
    evaluators.build("adm_fid", reference=tmp_path / "absent.npz", inception=tmp_path / "absent.pth")


@pytest.mark.slow  # the 2048-d float64 Fréchet distances dominate (~15 s on a quiet 2-core CPU)
def test_adm_fid_evaluator_on_its_own_reference(inception_file):
  from dyngen.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  net = evaluation.load_inception(inception_file)
  images = np.random.default_rng(7).integers(0, 256, size=(5, 24, 24, 3)).astype(np.uint8)
  evaluator = evaluators.build("adm_fid", reference={"arr_0": images}, inception=net, batch_size=5)
  metrics = evaluator(images, labels=None)
  assert sorted(metrics) == ["fid", "inception_score", "precision", "recall", "sfid"]
  assert metrics["fid"] == pytest.approx(0.0, abs=1e-6) and metrics["sfid"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["precision"] == metrics["recall"] == 1.0
  logits = net.features(images, batch_size=5)["logits"]
  assert metrics["inception_score"] == pytest.approx(inception_score_reference(logits, 5000), rel=1e-9)


def test_digits_evaluator_wraps_sample_quality(tmp_path):
  from dyngen import data  # pylint: disable=g-import-not-at-top
  from dyngen.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  config = data.default_config("digits")
  config.data_dir = str(tmp_path / "tfds")
  images, labels = data.load_split_arrays(config, "test")
  evaluator = evaluators.build("digits", data_config=config)
  expected = evaluation.digits_sample_quality(images[:60], labels[:60], config, classifier=evaluator.classifier)
  assert evaluator(images[:60], labels[:60]) == pytest.approx(expected, rel=0, abs=0)
  assert expected["classifier_accuracy_on_samples"] >= 0.9  # real digits: the classifier recognises them
