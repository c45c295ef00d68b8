"""Training: the SFT recipe (`sft`), its checkpoints (`checkpoints`) and the metadata of the
model directory it writes (`model_dir`).

Stage 3 (`selfalign.stages.stage3_engrave`) and stage 4's final model both train through `sft`;
only checkpoints that `checkpoints` finds complete are resumed; everything that reads what a
trained model directory says about itself goes through `model_dir`.
"""
