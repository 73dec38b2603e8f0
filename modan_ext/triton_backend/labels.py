"""Device side of the labels: popcounts of packed label words and the weight of each pair.

The op contract's label rule (ARCHITECTURE.md, "Semantics"), for a tile of
(row, column) pairs of distinct rows:
* same image: a positive with weight 1;
* multi-hot: n_and = popcount(y_i & y_j); the pair is a positive iff n_and > 0 and its integer
  key (the similarity's denominator, see `thresholds.py`) is at most `limits[n_and]`, a table that
  decides exactly as `csrc/supcon_pair.h` does in double; its weight is the similarity itself
  (1 for binary);
* class ids: a positive iff the ids are equal and `cid_positive` (threshold <= 1), weight 1.

Everything is plain integer and float Triton, so the interpreter runs it as it is (no libdevice):
the SWAR popcount below becomes POPC on NVIDIA GPUs (the codegen check asserts it).
"""
import triton
import triton.language as tl

from ..options import LABEL_KIND_CODES, WEIGHTING_CODES

# Codes of the op contract (modan_ext.options, = the C++ enums); tl.constexpr so that kernels
# may read them (Python: `.value`).
MULTI_HOT = tl.constexpr(LABEL_KIND_CODES["multi_hot"])
CLASS_IDS = tl.constexpr(LABEL_KIND_CODES["class_ids"])

JACCARD = tl.constexpr(WEIGHTING_CODES["jaccard"])
DICE = tl.constexpr(WEIGHTING_CODES["dice"])
COSINE = tl.constexpr(WEIGHTING_CODES["cosine"])
OVERLAP = tl.constexpr(WEIGHTING_CODES["overlap"])
BINARY = tl.constexpr(WEIGHTING_CODES["binary"])


@triton.jit
def popcount64(x):
    """Set bits of each int64 lane, as int32 (SWAR)."""
    x = x.to(tl.uint64, bitcast=True)
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def label_counts(labels_ptr, images, valid, words):
    """Number of labels of each image in `images` (multi-hot rows of `words` int64 words)."""
    count = tl.zeros(images.shape, dtype=tl.int32)
    base = images.to(tl.int64) * words
    for w in range(0, words):
        count += popcount64(tl.load(labels_ptr + base + w, mask=valid, other=0))
    return count


@triton.jit
def intersections(labels_ptr, img_r, valid_r, img_c, valid_c, words):
    """(shared labels of every (row, column) image pair [BM, BN], labels of each column [BN])."""
    shared = tl.zeros((img_r.shape[0], img_c.shape[0]), dtype=tl.int32)
    n_c = tl.zeros(img_c.shape, dtype=tl.int32)
    base_r = img_r.to(tl.int64) * words
    base_c = img_c.to(tl.int64) * words
    for w in range(0, words):
        yr = tl.load(labels_ptr + base_r + w, mask=valid_r, other=0)
        yc = tl.load(labels_ptr + base_c + w, mask=valid_c, other=0)
        shared += popcount64(yr[:, None] & yc[None, :])
        n_c += popcount64(yc)
    return shared, n_c


@triton.jit
def pair_weights(labels_ptr, limits_ptr, words, label_kind, weighting, cid_positive,
                 img_r, n_r, valid_r, img_c, valid_c, DTYPE: tl.constexpr):
    """w[BM, BN] in DTYPE: the positive weight of each pair (0: not a positive), for row images
    img_r with n_r labels each (`label_counts`, multi-hot only) and column images img_c. The
    caller masks the diagonal (a row is never its own positive) and rows past the end."""
    if label_kind == CLASS_IDS:
        id_r = tl.load(labels_ptr + img_r, mask=valid_r, other=0)
        id_c = tl.load(labels_ptr + img_c, mask=valid_c, other=0)
        positive = (id_r[:, None] == id_c[None, :]) & (cid_positive != 0)
        w = tl.where(positive, 1.0, 0.0).to(DTYPE)
    else:
        shared, n_c = intersections(labels_ptr, img_r, valid_r, img_c, valid_c, words)
        sum_n = n_r[:, None] + n_c[None, :]
        if weighting == DICE:
            num = 2 * shared
            key = sum_n
        elif weighting == COSINE:
            num = shared
            key = n_r[:, None] * n_c[None, :]
        elif weighting == OVERLAP:
            num = shared
            key = tl.minimum(n_r[:, None], n_c[None, :])
        else:  # jaccard; binary thresholds the Jaccard similarity
            num = shared
            key = sum_n - shared
        positive = (shared > 0) & (key <= tl.load(limits_ptr + shared))
        key = tl.maximum(key, 1)  # >= 1 for every positive; no 0/0 in the lanes that are not
        if weighting == BINARY:
            value = tl.full(shared.shape, 1.0, DTYPE)
        elif weighting == COSINE:
            if DTYPE == tl.float64:
                root = tl.sqrt(key.to(DTYPE))  # float64 sqrt is correctly rounded
            else:
                root = tl.sqrt_rn(key.to(DTYPE))
            value = num.to(DTYPE) / root
        else:
            value = num.to(DTYPE) / key.to(DTYPE)
        w = tl.where(positive, value, 0.0).to(DTYPE)
    same_image = img_r[:, None] == img_c[None, :]
    return tl.where(same_image, 1.0, w).to(DTYPE)
