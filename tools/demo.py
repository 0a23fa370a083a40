"""`make demo`: the main job on the miniature world (lands with the miniature-world issue)."""
import sys

sys.exit('make demo: the miniature world (data generator, tiny trained models, quantization table) '
         'has not landed yet; run `make test` for the test suite.')
