"""What watches the representation while it trains and what every evaluation starts from: the
online classifier callback (``SSLOnlineEvaluator``), the labelled split each rank scores its
slice of (``EvalSplit``), feature extraction, and the accuracy plots. Methods may import this
part (CPC v2 trains the online classifier itself); it imports no method, so ``eval`` and
``export``, which do, stay above both (``docs/parts.toml``)."""

from scale_ssl.probes.eval_split import EvalSplit, RankSplitLoader, rank_features
from scale_ssl.probes.features import extract_features
from scale_ssl.probes.online_evaluator import SSLOnlineEvaluator, build_classifier_head

__all__ = ["EvalSplit", "RankSplitLoader", "SSLOnlineEvaluator", "build_classifier_head", "extract_features", "rank_features"]
