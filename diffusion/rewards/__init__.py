"""Reward models for generated images and videos, and the AI feedback built on them (`mmalign reward ...`).

    scorers   open_clip CLIP and aesthetic scorers: load, score, save (`load_scorer`, `save_scorer`)
    named     PickScore, CLIP score, HPS v2/v2.1, ImageReward, the LAION aesthetic predictor, by name
    combine   reward specs: one named scorer or a weighted sum, `pickscore:1.0,hpsv21=FILE:0.5`
    train     Bradley-Terry fine-tuning of a scorer on preference pairs (`reward train`)
    score     scores of images, or a scorer checked against labelled pairs (`reward score`)
    relabel   a Pick-a-Pic dataset relabelled by a scorer (`reward relabel`)
    pairs     samples ranked by a scorer and paired into a Pick-a-Pic dataset (`reward pairs`)
"""

from .scorers import RewardModel, Scorer, ScorerOptions, load_scorer, save_scorer

__all__ = ["RewardModel", "Scorer", "ScorerOptions", "load_scorer", "save_scorer"]
