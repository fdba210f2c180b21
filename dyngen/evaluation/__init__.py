"""Sample-quality metrics: Fréchet distance, the FID InceptionV3 and ADM's metrics, the digits classifier."""
from dyngen.evaluation.digits_classifier import DigitsClassifier
from dyngen.evaluation.digits_classifier import load_or_train_digits_classifier
from dyngen.evaluation.digits_classifier import train_digits_classifier
from dyngen.evaluation.frechet import feature_statistics
from dyngen.evaluation.frechet import frechet_distance
from dyngen.evaluation.sample_quality import digits_sample_quality
from dyngen.evaluation.inception import InceptionV3
from dyngen.evaluation.inception_weights import load_inception
from dyngen.evaluation.adm_metrics import compute_metrics as compute_adm_metrics
from dyngen.evaluation.adm_metrics import inception_score
from dyngen.evaluation.adm_metrics import precision_recall
from dyngen.evaluation import evaluators
