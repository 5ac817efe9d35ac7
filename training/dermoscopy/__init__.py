"""The dermoscopy check ("is this picture dermoscopy at all?", the verdict `not_dermoscopy`), fitted for a release:
the step itself (`check`: `python -m training dermoscopy-check`), the rejectors it compares on validation sources
(`rejectors`, `outlier_exposure`), its data (`pool`: pictures that Debian and PyPI packages ship, split whole by
source; `nonskin`: drawn pictures; `shifts`: lesions under other clinics' light and cameras) and the lesion
features it is fitted on (`features`). "Gate" names only the HTTP entry (stack/gate.py), never this check.
"""
