"""Robustness evaluation for VARS: metrics, attacks, dataset readers and evaluation loops.

Metrics (:mod:`.metrics`): top-1 accuracy, mCE normalised by AlexNet's ImageNet-C errors (paired by
corruption name), the 200-class ImageNet-A/R subsets from timm's index lists, NSS, and class-agnostic
segmentation scores (mIoU, FP, FN at threshold 0.3 of the [0, 1]-normalised attention map).
Attacks (:mod:`.attacks`): PGD (L-inf, eps 1/255, step 0.5/255, 5 steps, random start) and FGSM in
[0, 1] pixel space, with a normalisation wrapper. Datasets (:mod:`.datasets`): validated ImageFolder
and ImageNet-C trees, Fashion-MNIST IDX files, scikit-learn digits, Fashion-MNIST-C generation.
"""
from .attacks import NormalizedModel, fgsm_attack, pgd_attack
from .datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, BatchAugment, DatasetError, TensorImageDataset,
                       check_image_folder, check_train_val_root, corrupt_images, fashion_mnist_c,
                       find_fashion_mnist, imagenet_c_folders, load_digits_arrays, load_fashion_mnist,
                       read_idx, require_imagecorruptions)
from .engine import (VARS_ATTENTIONS, VARS_MODELS, attention_maps, autocast, create_model, evaluate,
                     last_attention_module, missing_vars_models)
from .metrics import (ALEXNET_ERRORS, IMAGENET_C_CORRUPTIONS, SegmentationMeter, accuracy, corruption_error,
                      imagenet_subset_indices, imagenet_subset_mask, mask_logits, mean_corruption_error,
                      mean_std, normalize_map, nss, top1_accuracy)

__all__ = [
    "ALEXNET_ERRORS", "BatchAugment", "IMAGENET_C_CORRUPTIONS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "VARS_ATTENTIONS",
    "VARS_MODELS", "DatasetError", "NormalizedModel", "SegmentationMeter", "TensorImageDataset", "accuracy",
    "attention_maps", "autocast", "check_image_folder", "check_train_val_root", "corrupt_images",
    "corruption_error", "create_model", "evaluate", "fashion_mnist_c", "fgsm_attack", "find_fashion_mnist",
    "imagenet_c_folders", "imagenet_subset_indices", "imagenet_subset_mask", "last_attention_module",
    "load_digits_arrays", "load_fashion_mnist", "mask_logits", "mean_corruption_error", "mean_std",
    "missing_vars_models", "normalize_map", "nss", "pgd_attack", "read_idx", "require_imagecorruptions",
    "top1_accuracy",
]
