"""FID and Inception Score through torch-fidelity (optional), against reference statistics in
the official ``fid_stats/*.npz`` format (``mu``, ``sigma``)."""
import os

import numpy as np

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
HOW_TO_GET_WEIGHTS = (
    f"download {INCEPTION_FILE} (torch-fidelity's release v0.2.0 assets) on a machine with "
    f"network access and pass it with --inception-weights PATH, or put it in "
    f"$TORCH_HOME/hub/checkpoints/")


class EvaluationError(RuntimeError):
    """FID/IS cannot be computed, with what to do about it."""


def check_fid_inputs(stats_path, weights_path=None):
    """Fail before sampling, not after hours of it."""
    if not os.path.isfile(stats_path):
        raise FileNotFoundError(f"FID reference statistics {stats_path!r} do not exist")
    with np.load(stats_path) as stats:
        if not {"mu", "sigma"} <= set(stats.files):
            raise EvaluationError(f"{stats_path!r} is not FID statistics: it needs arrays 'mu' "
                                  f"and 'sigma', it has {stats.files}")
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights {weights_path!r} do not exist")
    torch_fidelity()


def torch_fidelity():
    try:
        import torch_fidelity as module
    except ImportError as err:
        raise EvaluationError(f"--fid needs torch-fidelity (and torchvision): pip install "
                              f"torch-fidelity ({err})") from None
    return module


def fid_and_inception_score(images_dir, stats_path, cuda, weights_path=None):
    """{"fid": ..., "inception_score": ...} of the PNGs in `images_dir`.

    Stock torch-fidelity compares two image sets; the official evaluation compares with stored
    statistics, so the features of the samples are extracted once with torch-fidelity's
    Inception and the Fréchet distance is taken against the file's (mu, sigma).
    """
    torch_fidelity()
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id,
                                      resolve_feature_extractor, resolve_feature_layer_for_metric)
    kwargs = dict(input1=images_dir, cuda=cuda, isc=True, fid=True, verbose=False)
    if weights_path is not None:
        kwargs["feature_extractor_weights_path"] = weights_path
    fid_layer = resolve_feature_layer_for_metric("fid", **kwargs)
    isc_layer = resolve_feature_layer_for_metric("isc", **kwargs)
    try:
        extractor = create_feature_extractor(resolve_feature_extractor(**kwargs),
                                             sorted({fid_layer, isc_layer}), **kwargs)
    except OSError as err:  # urllib's URLError (no network) is an OSError
        raise EvaluationError(f"the Inception weights could not be obtained ({err}); "
                              f"{HOW_TO_GET_WEIGHTS}") from None
    features = extract_featuresdict_from_input_id(1, extractor, **kwargs)
    samples = fid_featuresdict_to_statistics(features, fid_layer)
    with np.load(stats_path) as ref:  # torch-fidelity wants both in one dtype: float64
        reference = {k: ref[k].astype(np.float64) for k in ("mu", "sigma")}
    samples = {k: np.asarray(samples[k], dtype=np.float64) for k in ("mu", "sigma")}
    fid = fid_statistics_to_metric(samples, reference, False)
    isc = isc_featuresdict_to_metric(features, isc_layer, **kwargs)
    return {"fid": float(fid["frechet_inception_distance"]),
            "inception_score": float(isc["inception_score_mean"])}
