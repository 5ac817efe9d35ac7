"""What every training job stands on: HAM10000 records and the lesion-grouped split (`data`, `split`), where
and in what precision a step computes (`device`), checkpoints (`checkpoint`), scores (`metrics`) and plots (`plots`).
"""
