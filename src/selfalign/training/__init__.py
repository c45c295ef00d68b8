"""Training: the SFT recipe (`sft`) and the metadata of the model directory it writes (`model_dir`).

Stage 3 (`selfalign.stages.stage3_engrave`) and stage 4's final model both train through `sft`;
everything that reads what a trained model directory says about itself goes through `model_dir`.
"""
