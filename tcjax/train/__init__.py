"""Training: the PaliGemma next-token loss and a jittable, shardable optimizer step."""

from tcjax.train.step import TrainState, loss_fn, make_train_step

__all__ = ["TrainState", "loss_fn", "make_train_step"]
