"""Building a release from a trained network: export (`export`), calibration (`calibrate`), when an answer urges
an examination (`concern`), the int8 variant (`quantize`) and the model card (`model_card`). The dermoscopy check
a release also carries is fitted by training/dermoscopy/.
"""
