"""The training side: the one loop (``trainer``), the recipe contract (``recipe``), the run folder (``rundir``: lock,
guard, config history, what a start does), stopping on a signal (``stopping``), the pretraining and fine-tuning
recipes and the k-NN monitor.

Layer: above ``fcmae.models``, ``fcmae.data``, ``fcmae.weights``, ``fcmae.config`` and ``fcmae.evaluation``.
"""
