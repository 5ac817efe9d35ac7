"""Building a release from a trained network: export (`export`), calibration (`calibrate`), the dermoscopy gate
(`abstention`, with its data: `nonskin`, `shifts`), the int8 variant (`quantize`) and the model card
(`model_card`).
"""
