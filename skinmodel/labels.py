"""The seven HAM10000 classes: codes, names, descriptions for people, and which are concerning (malignant or
pre-malignant: the page words a high rank of these more strongly). The one place they are declared; a release
carries them in its meta.json (ReleaseMeta), and everything that serves a release reads them from there.
Standard library only: clients (./skin predict) import it without torch.
"""
from __future__ import annotations

CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_FULL_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
CLASS_DESCRIPTIONS = {
    "akiec": "Sun-damage lesions that can progress to squamous cell carcinoma; usually treated.",
    "bcc": "The most common skin cancer; grows slowly and rarely spreads, but needs treatment.",
    "bkl": "Benign growths such as seborrhoeic keratoses, solar lentigines and lichen-planus-like keratoses.",
    "df": "A benign, firm nodule of the skin, often on the legs.",
    "mel": "A malignant tumour of pigment cells; early removal matters.",
    "nv": "A common mole; benign, but changes in a mole deserve a check.",
    "vasc": "Blood-vessel lesions such as cherry angiomas, angiokeratomas and pyogenic granulomas.",
}
CONCERNING = ("mel", "bcc", "akiec")
