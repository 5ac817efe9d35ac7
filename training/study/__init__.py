"""Running a study of many networks: the whole pipeline (`pipeline`: `python -m training all`), the distillation
grid (`grid`), the recipe search (`recipe_search`), where a study stands (`status`), and the accelerator run with
its packing (`accelerator`, `unpack`).
"""
