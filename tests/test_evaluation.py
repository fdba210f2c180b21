"""Fréchet distance against pytorch-fid's value (tests/data/inception_fid) and analytic cases; the digits
classifier and the quickstart quality figures on real digits.

tests/data/inception_fid/frechet_subset.npz holds the Fréchet arrays of the fixture unchanged
(fid_feats_a/b from its inputs.npz, fid_mu/sigma_a/b and fid_value from its outputs.npz; manifest.json
describes them). The Inception network arrays are not needed here and were left out.
"""
import json
import pathlib

import numpy as np
import pytest

from dyngen import data
from dyngen import evaluation
from dyngen.evaluation import digits_classifier

CASE = pathlib.Path(__file__).parent / "data" / "inception_fid"


@pytest.fixture(scope="module")
def fid_case():
  arrays = np.load(CASE / "frechet_subset.npz")
  return {k: arrays[k] for k in arrays.files}


def test_feature_statistics_match_pytorch_fid(fid_case):
  # float64 mean and unbiased covariance, as pytorch-fid's numpy code: equal up to summation order (1e-13).
  for part in ("a", "b"):
    mu, sigma = evaluation.feature_statistics(fid_case[f"fid_feats_{part}"])
    np.testing.assert_allclose(mu, fid_case[f"fid_mu_{part}"], rtol=0, atol=1e-13)
    np.testing.assert_allclose(sigma, fid_case[f"fid_sigma_{part}"], rtol=0, atol=1e-13)


def test_frechet_distance_matches_pytorch_fid(fid_case):
  manifest = json.loads((CASE / "manifest.json").read_text())
  expected = float(fid_case["fid_value"])
  assert expected == pytest.approx(55.5886, abs=1e-4)
  assert expected == manifest["stats"]["fid_value"]
  distance = evaluation.frechet_distance(fid_case["fid_mu_a"], fid_case["fid_sigma_a"],
                                         fid_case["fid_mu_b"], fid_case["fid_sigma_b"])
  # The manifest's own eigenvalue cross-check agreed with scipy.sqrtm to 9e-12; allow 1e-10 relative.
  assert distance == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_analytic_cases():
  rng = np.random.default_rng(0)
  # One dimension: d² = (m1 - m2)² + (s1 - s2)² with s the standard deviations.
  assert evaluation.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-14)
  # Diagonal covariances: the dimensions add up.
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
  # A rotation of both covariances changes nothing (the distance is basis-free).
  rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  rotated = evaluation.frechet_distance(rotation @ mu1, rotation @ np.diag(a) @ rotation.T,
                                        rotation @ mu2, rotation @ np.diag(b) @ rotation.T)
  assert rotated == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_singular_covariances():
  # 5 samples in 16 dimensions: rank-4 covariances, where sqrtm(S1 S2) can turn complex or NaN.
  rng = np.random.default_rng(1)
  few = rng.normal(size=(5, 16))
  mu, sigma = evaluation.feature_statistics(few)
  assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-10
  other_mu, other_sigma = evaluation.feature_statistics(rng.normal(size=(7, 16)) + 1.0)
  forward = evaluation.frechet_distance(mu, sigma, other_mu, other_sigma)
  backward = evaluation.frechet_distance(other_mu, other_sigma, mu, sigma)
  assert np.isfinite(forward) and forward > 0
  assert forward == pytest.approx(backward, rel=1e-9)  # A distance is symmetric.


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\); expected \(2, 2\)"):
    evaluation.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
  with pytest.raises(ValueError, match="N >= 2"):
    evaluation.feature_statistics(np.zeros((1, 4)))


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
  config = data.default_config("digits")
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config


@pytest.fixture(scope="module")
def classifier(digits_config):
  return evaluation.load_or_train_digits_classifier(digits_config, seed=0)


def test_classifier_accuracy_on_real_test_split(classifier, digits_config):
  test_images, test_labels = data.load_split_arrays(digits_config, "test")
  accuracy = float(np.mean(classifier.predict(test_images) == test_labels))
  assert accuracy == classifier.test_accuracy
  # The issue asks for >= 95% on the 300 real test digits; the MLP reaches ~98%.
  assert accuracy >= 0.95


def test_classifier_is_cached(classifier, digits_config):
  cached = evaluation.load_or_train_digits_classifier(digits_config, seed=0)
  test_images, _ = data.load_split_arrays(digits_config, "test")
  np.testing.assert_array_equal(cached.features(test_images), classifier.features(test_images))
  assert cached.test_accuracy == classifier.test_accuracy


def test_quality_of_real_and_noise_images(classifier, digits_config):
  test_images, test_labels = data.load_split_arrays(digits_config, "test")
  real = evaluation.digits_sample_quality(test_images, test_labels, digits_config, classifier=classifier)
  # The test split against itself: identical statistics, distance 0 up to float64 round-off.
  assert abs(real["frechet_distance"]) < 1e-6
  assert real["classifier_accuracy_on_samples"] == classifier.test_accuracy
  # 300 real train images vs the test split: small but not 0 (different images, finite N).
  assert 0.1 < real["reference_frechet"] < 20.0
  noise = np.random.default_rng(0).uniform(-1.0, 1.0, test_images.shape)
  judged = evaluation.digits_sample_quality(noise, test_labels, digits_config, classifier=classifier)
  assert judged["frechet_distance"] > 20 * real["reference_frechet"]
  assert judged["classifier_accuracy_on_samples"] < 0.3  # Chance is 0.1.


def test_uint8_and_float_samples_are_judged_alike(classifier, digits_config):
  test_images, _ = data.load_split_arrays(digits_config, "test")
  as_uint8 = np.round((test_images + 1.0) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(classifier.features(as_uint8), classifier.features(test_images))
  # Float samples are clipped to [-1, 1] as when they are saved as images.
  np.testing.assert_array_equal(classifier.features(np.clip(test_images * 3.0, -1, 1)),
                                classifier.features(test_images * 3.0))


def test_bad_inputs_are_refused(classifier, digits_config):
  with pytest.raises(ValueError, match=r"expects \(N, 8, 8, 1\)"):
    classifier.predict(np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(ValueError, match=r"labels must be digits in \[0, 10\)"):
    evaluation.digits_sample_quality(np.zeros((2, 8, 8, 1), np.float32), np.array([0, 10]), digits_config,
                                     classifier=classifier)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    evaluation.digits_sample_quality(np.zeros((2, 8, 8, 1), np.float32), np.array([0]), digits_config,
                                     classifier=classifier)
  imagenet = data.default_config("imagenet2012")
  with pytest.raises(ValueError, match="config.data.name='digits'"):
    evaluation.load_or_train_digits_classifier(imagenet)


def test_classifier_training_is_deterministic(digits_config, classifier):
  again = digits_classifier.train_digits_classifier(digits_config, seed=0)
  test_images, _ = data.load_split_arrays(digits_config, "test")
  # Same seed, same data order, same float32 program on the same machine: bit-identical.
  np.testing.assert_array_equal(again.features(test_images), classifier.features(test_images))
