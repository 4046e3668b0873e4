"""A clear message when detectron2 is missing (it is not on PyPI under its own name)."""


def check_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "mnc_d2 needs detectron2, which is not on PyPI under that name. Run `bash scripts/install.sh` "
            "(builds it from the pb1-detectron2==0.6 sdist with the patches listed in docs/install.md), or install "
            "an official detectron2 (https://github.com/facebookresearch/detectron2) first."
        ) from e
