"""The Constitutional AI method (Bai et al. 2022) on top of the shared-model engine.

Stages: constitution -> SL-CAI (critique/revision) -> SFT -> AI feedback labels ->
preference model -> PPO or DPO -> evaluation. Runnable through the ``cai`` command.
"""
