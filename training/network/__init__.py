"""Training one network: the loop (`train`: run_or_resume, train_one_epoch), the recipe's losses, weights and
schedule (`recipe`) and the batched augmentation on the device (`augment`).
"""
