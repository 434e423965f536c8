"""The embedded 8x8 digits task: data, a class-conditional denoiser network, a digit classifier and rewards.

Images are [B, 1, 8, 8] float32 in [-1, 1]; classes are 0..9 and index 10 is the null (unconditional)
class used by classifier-free guidance.
"""

from msdda.tasks.digits.classifier import (
    ClassifierLoadError,
    DigitsClassifier,
    DigitsClassifierConfig,
    accuracy,
    default_classifier_dir,
    load_classifier,
    save_classifier,
    train_and_save_default_classifier,
    train_classifier,
)
from msdda.tasks.digits.data import (
    IMAGE_SHAPE,
    NULL_CLASS,
    NUM_CLASSES,
    DigitsSplit,
    DigitsTaskError,
    load_digits_tensor,
    split_digits,
)
from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig, count_parameters
from msdda.tasks.digits.rewards import (
    AlignmentReward,
    ContrastReward,
    InkReward,
    SmoothnessReward,
    SymmetryReward,
    TemplateReward,
    class_mean_images,
    clear_classifier_cache,
    load_default_classifier,
)

__all__ = [
    "IMAGE_SHAPE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "AlignmentReward",
    "ClassifierLoadError",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "DigitsDenoiser",
    "DigitsDenoiserConfig",
    "DigitsSplit",
    "DigitsTaskError",
    "ContrastReward",
    "InkReward",
    "SmoothnessReward",
    "SymmetryReward",
    "TemplateReward",
    "accuracy",
    "class_mean_images",
    "clear_classifier_cache",
    "count_parameters",
    "default_classifier_dir",
    "load_classifier",
    "load_default_classifier",
    "load_digits_tensor",
    "save_classifier",
    "split_digits",
    "train_and_save_default_classifier",
    "train_classifier",
]
