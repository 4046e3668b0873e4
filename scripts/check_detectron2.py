"""Checks that the importable detectron2 works for mnc_d2 (exit 1 with the reason otherwise)."""
import sys
import warnings

PATCH_LEVEL = 3  # the LEVEL scripts/patch_detectron2_sdist.sh writes; an older patched build is rebuilt


def main(quiet: bool) -> int:
    warnings.filterwarnings("ignore")
    try:
        import numpy
        import PIL
        import torch
        import detectron2
        from detectron2 import model_zoo
        from detectron2.data import transforms  # noqa: F401  (Pillow >= 10: Image.LINEAR)
        from detectron2.utils.collect_env import collect_env_info

        collect_env_info()  # needs detectron2._C (stub or real)
        from detectron2 import _C

        if not hasattr(_C, "nms_rotated"):  # our patched build (an official one has the C++ ops): current?
            try:
                from detectron2._mnc_d2_patches import LEVEL
            except ImportError:
                LEVEL = 1
            if LEVEL < PATCH_LEVEL:
                raise RuntimeError(f"patched by an older scripts/patch_detectron2_sdist.sh (level {LEVEL} < "
                                   f"{PATCH_LEVEL}): rebuild it (scripts/install.sh does)")
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    except Exception as e:  # noqa: BLE001 - report any failure to the installer
        print(f"detectron2 is not usable: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"OK detectron2 {detectron2.__version__} ({detectron2.__file__}), torch {torch.__version__}, "
              f"numpy {numpy.__version__}, Pillow {PIL.__version__}, cuda={torch.cuda.is_available()}")
    return 0


if __name__ == "__main__":
    sys.exit(main("--quiet" in sys.argv))
