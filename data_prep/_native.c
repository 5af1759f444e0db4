#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* data_prep._native: the word numbering of the Chinese build's analysis (data_prep/chinese.py, WordIds),
   its sentence splitting (split_sentences below; data_prep/normalize.py, split_sentences_batch), the
   encoding's token gather (gather_ranges) and its default segmenter, jieba in C (Jieba, --segmenter
   jieba-c), compiled by `pip install -e .` (setup.py; launchers/setup.sh runs it). Optional: without it
   the same numbering runs through the dict in Python, the split through regular expressions and the
   segmentation through rjieba (same results; tests/test_native.py holds the paths equal).

   WordNumbers(index).number(words, out) numbers a list of words through the dict ``index`` (word -> id;
   a word not in it gets id len(index) and is added), writing the ids to ``out`` (int64). In front of
   the dict sits a cache for words of 1-4 characters below U+10000 (most Chinese words): such a word
   packs into one 64-bit key (16 bits a character), probed in an open-addressing table of (key, id)
   pairs. The segmenter's strings are new objects each time, so a dict probe hashes each one and
   compares it with the stored key (two more objects in memory): ~250 ns a word through
   map(dict.__getitem__) against ~30 ns here. The dict stays complete: every word numbered is in it. */

typedef struct {
    PyObject_HEAD
    PyObject *index;      /* dict: word -> int id */
    uint64_t *keys;       /* packed words; 0 = empty slot */
    int64_t *vals;        /* their ids */
    size_t mask;          /* capacity - 1 (a power of 2; at most half full) */
    size_t used;
} WordNumbers;

static PyTypeObject WordNumbersType;

static inline uint64_t mix(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL; k ^= k >> 33;
    return k;
}

/* A hash of code points (FNV-1a, then mixed with the length): TokenIndex and sum_tables. */
#define TI_SEED 0xcbf29ce484222325ULL
static inline uint64_t ti_step(uint64_t h, Py_UCS4 c) { return (h ^ c) * 0x100000001b3ULL; }  /* FNV-1a */
static inline uint64_t ti_final(uint64_t h, Py_ssize_t n) { return mix(h ^ ((uint64_t)n << 40)); }

/* 1-4 characters, each in 1..0xFFFF: key = c0 | c1<<16 | c2<<32 | c3<<48 (never 0: 0 marks an empty
   slot; the length is implied, no character being 0). Any other word: 0 (it goes to the dict). */
static inline uint64_t pack(PyObject *w) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(w);
    if (n < 1 || n > 4) return 0;
    int kind = PyUnicode_KIND(w);
    const void *data = PyUnicode_DATA(w);
    if (kind == PyUnicode_4BYTE_KIND) return 0;
    uint64_t key = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c == 0) return 0;
        key |= (uint64_t)c << (16 * i);
    }
    return key;
}

static int grow(WordNumbers *t) {
    size_t cap = (t->mask + 1) * 2;
    uint64_t *keys = calloc(cap, sizeof(uint64_t));
    int64_t *vals = malloc(cap * sizeof(int64_t));
    if (!keys || !vals) { free(keys); free(vals); PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i <= t->mask; i++) {
        if (!t->keys[i]) continue;
        size_t j = mix(t->keys[i]) & (cap - 1);
        while (keys[j]) j = (j + 1) & (cap - 1);
        keys[j] = t->keys[i]; vals[j] = t->vals[i];
    }
    free(t->keys); free(t->vals);
    t->keys = keys; t->vals = vals; t->mask = cap - 1;
    return 0;
}

static int wn_init(WordNumbers *self, PyObject *args, PyObject *kwds) {
    PyObject *index;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &index)) return -1;
    Py_XSETREF(self->index, Py_NewRef(index));
    free(self->keys); free(self->vals);
    self->mask = (1 << 16) - 1; self->used = 0;
    self->keys = calloc(self->mask + 1, sizeof(uint64_t));
    self->vals = malloc((self->mask + 1) * sizeof(int64_t));
    if (!self->keys || !self->vals) { PyErr_NoMemory(); return -1; }
    return 0;
}

static void wn_dealloc(WordNumbers *self) {
    Py_XDECREF(self->index);
    free(self->keys); free(self->vals);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The id of one word through the dict (adding it if new). -1 on error. */
static Py_ssize_t dict_id(WordNumbers *self, PyObject *w, Py_ssize_t *added) {
    PyObject *v = PyDict_GetItemWithError(self->index, w);
    if (v) return PyLong_AsSsize_t(v);
    if (PyErr_Occurred()) return -1;
    Py_ssize_t id = PyDict_GET_SIZE(self->index);
    PyObject *o = PyLong_FromSsize_t(id);
    if (!o) return -1;
    int rc = PyDict_SetItem(self->index, w, o);
    Py_DECREF(o);
    if (rc < 0) return -1;
    (*added)++;
    return id;
}

static PyObject *wn_number(WordNumbers *self, PyObject *args) {
    PyObject *words, *out;
    if (!PyArg_ParseTuple(args, "OO", &words, &out)) return NULL;
    if (!self->keys) { PyErr_SetString(PyExc_RuntimeError, "WordNumbers was not initialised"); return NULL; }
    PyObject *seq = PySequence_Fast(words, "words must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer view;
    if (PyObject_GetBuffer(out, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) { Py_DECREF(seq); return NULL; }
    if (view.len < n * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(&view); Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "out must be an int64 buffer with room for every word");
        return NULL;
    }
    int64_t *ids = (int64_t *)view.buf;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t added = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = items[i];
        if (!PyUnicode_Check(w)) { PyErr_SetString(PyExc_TypeError, "words must be str"); goto fail; }
        uint64_t key = pack(w);
        if (key) {
            size_t j = mix(key) & self->mask;
            while (self->keys[j] && self->keys[j] != key) j = (j + 1) & self->mask;
            if (self->keys[j]) { ids[i] = self->vals[j]; continue; }
            Py_ssize_t id = dict_id(self, w, &added);
            if (id < 0) goto fail;
            self->keys[j] = key; self->vals[j] = id; ids[i] = id;
            if (++self->used * 2 > self->mask + 1 && grow(self) < 0) goto fail;
        } else {
            Py_ssize_t id = dict_id(self, w, &added);
            if (id < 0) goto fail;
            ids[i] = id;
        }
    }
    PyBuffer_Release(&view); Py_DECREF(seq);
    return PyLong_FromSsize_t(added);
fail:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad id in the word index");
    PyBuffer_Release(&view); Py_DECREF(seq);
    return NULL;
}

/* ---- sentence splitting (data_prep/normalize.py, split_sentences_batch) ---------------------------
   split_sentences(documents, limit) -> (sentences of each document, indices of the documents holding
   a sentence longer than ``limit`` characters). A sentence ends at a line break and after a match of
   normalize._SENTENCE_END: a run of 。！？!? or a run of … or a "." followed by a space, then any
   closing quotes/brackets; each piece is stripped of whitespace (str.strip) and kept if not empty.
   The caller cuts the long ones (normalize._add). tests/test_data_prep_zh.py holds it equal to the
   regular-expression split of every document. */

static inline int is_end(Py_UCS4 c) {
    return c == 0x3002 || c == 0xFF01 || c == 0xFF1F || c == '!' || c == '?';  /* 。！？!? */
}

static inline int is_closer(Py_UCS4 c) {
    switch (c) {  /* ”’」』）)]】"'》 */
    case 0x201D: case 0x2019: case 0x300D: case 0x300F: case 0xFF09: case ')': case ']': case 0x3011:
    case '"': case '\'': case 0x300B:
        return 1;
    default:
        return 0;
    }
}

/* Appends text[a:b] stripped, if not empty; *longest: its length if larger. 0 ok, -1 error. */
static int add_piece(PyObject *out, PyObject *text, int kind, const void *data, Py_ssize_t a, Py_ssize_t b,
                     Py_ssize_t *longest) {
    while (a < b && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, a))) a++;
    while (b > a && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, b - 1))) b--;
    if (a == b) return 0;
    PyObject *piece = PyUnicode_Substring(text, a, b);
    if (!piece) return -1;
    int rc = PyList_Append(out, piece);
    Py_DECREF(piece);
    if (b - a > *longest) *longest = b - a;
    return rc;
}

static PyObject *split_sentences(PyObject *self, PyObject *args) {
    PyObject *documents;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On", &documents, &limit)) return NULL;
    PyObject *seq = PySequence_Fast(documents, "documents must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *all = PyList_New(n), *long_docs = PyList_New(0);
    if (!all || !long_docs) goto fail;
    for (Py_ssize_t d = 0; d < n; d++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, d);
        if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "documents must be str"); goto fail; }
        PyObject *out = PyList_New(0);
        if (!out) goto fail;
        PyList_SET_ITEM(all, d, out);
        int kind = PyUnicode_KIND(text);
        const void *data = PyUnicode_DATA(text);
        Py_ssize_t len = PyUnicode_GET_LENGTH(text), start = 0, i = 0, longest = 0;
        while (i < len) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            Py_ssize_t j = i;
            if (c == '\n') {
                if (add_piece(out, text, kind, data, start, i, &longest) < 0) goto fail;
                start = i + 1;
                i++;
                continue;
            }
            if (is_end(c)) {
                while (j < len && is_end(PyUnicode_READ(kind, data, j))) j++;
            } else if (c == 0x2026) {  /* … */
                while (j < len && PyUnicode_READ(kind, data, j) == 0x2026) j++;
            } else if (c == '.' && i + 1 < len && PyUnicode_READ(kind, data, i + 1) == ' ') {
                j = i + 1;
            } else {
                i++;
                continue;
            }
            while (j < len && is_closer(PyUnicode_READ(kind, data, j))) j++;
            if (add_piece(out, text, kind, data, start, j, &longest) < 0) goto fail;
            start = i = j;
        }
        if (add_piece(out, text, kind, data, start, len, &longest) < 0) goto fail;
        if (longest > limit) {
            PyObject *index = PyLong_FromSsize_t(d);
            if (!index || PyList_Append(long_docs, index) < 0) { Py_XDECREF(index); goto fail; }
            Py_DECREF(index);
        }
    }
    Py_DECREF(seq);
    PyObject *result = PyTuple_Pack(2, all, long_docs);
    Py_DECREF(all); Py_DECREF(long_docs);
    return result;
fail:
    Py_DECREF(seq); Py_XDECREF(all); Py_XDECREF(long_docs);
    return NULL;
}

/* gather_ranges(values, starts, counts, tokens, out) -> how many values were written: the concatenation
   of values[starts[t] : starts[t] + counts[t]] for t in tokens, into out (the Chinese encoding's gather
   of each word's tokens from the worker's memo, data_prep/chinese.py encode_shard; NumPy needs five
   passes over the output for it: concat_ranges' cumsum, repeat, arange and add, then the take).
   values and out: integers of one width (4 or 8 bytes); starts and tokens: int64; counts: int32 or
   int64. Every index is checked (a bad one raises IndexError/ValueError; out is then partly written). */
static int get_ints(PyObject *obj, Py_buffer *view, int writable, const char *name, int widths) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int integer = f[1] == 0 && strchr("bhilqn", *f) != NULL;  /* signed integers */
    if (!integer || !(view->itemsize & widths)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous array of signed %s-byte integers", name,
                     widths == 8 ? "8" : widths == 4 ? "4" : "4- or 8");
        return -1;
    }
    return 0;
}

/* join_items(items, indices, sep) -> sep.join(items[i] for i in indices): items a list of str, indices
   int64 (each checked), in two passes (lengths and widest character, then the copies) without the list
   of the chosen strs (a Chinese shard's ~40k words out of its worker's word table: 3-4x faster). */
static PyObject *join_items(PyObject *self, PyObject *args) {
    PyObject *items, *oidx, *sep;
    if (!PyArg_ParseTuple(args, "O!OU", &PyList_Type, &items, &oidx, &sep)) return NULL;
    Py_buffer vi;
    if (get_ints(oidx, &vi, 0, "indices", 8) < 0) return NULL;
    const int64_t *idx = (const int64_t *)vi.buf;
    Py_ssize_t k = vi.len / 8, n = PyList_GET_SIZE(items), seplen = PyUnicode_GET_LENGTH(sep), total = 0;
    Py_UCS4 widest = k > 1 ? PyUnicode_MAX_CHAR_VALUE(sep) : 0;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (idx[i] < 0 || idx[i] >= n) { PyErr_SetString(PyExc_IndexError, "join_items: an index is out of range"); goto done; }
        PyObject *item = PyList_GET_ITEM(items, idx[i]);
        if (!PyUnicode_Check(item)) { PyErr_SetString(PyExc_TypeError, "join_items: items must be str"); goto done; }
        total += PyUnicode_GET_LENGTH(item) + (i ? seplen : 0);
        if (PyUnicode_MAX_CHAR_VALUE(item) > widest) widest = PyUnicode_MAX_CHAR_VALUE(item);
    }
    result = PyUnicode_New(total, widest);
    if (!result) goto done;
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *item = PyList_GET_ITEM(items, idx[i]);
        if (i) { PyUnicode_CopyCharacters(result, at, sep, 0, seplen); at += seplen; }
        Py_ssize_t len = PyUnicode_GET_LENGTH(item);
        if (PyUnicode_CopyCharacters(result, at, item, 0, len) < 0) { Py_CLEAR(result); goto done; }
        at += len;
    }
done:
    PyBuffer_Release(&vi);
    return result;
}

static PyObject *gather_ranges(PyObject *self, PyObject *args) {
    PyObject *ov, *os, *oc, *ot, *oo;
    if (!PyArg_ParseTuple(args, "OOOOO", &ov, &os, &oc, &ot, &oo)) return NULL;
    Py_buffer v, s, c, t, o;
    if (get_ints(ov, &v, 0, "values", 4 | 8) < 0) return NULL;
    if (get_ints(os, &s, 0, "starts", 8) < 0) { PyBuffer_Release(&v); return NULL; }
    if (get_ints(oc, &c, 0, "counts", 4 | 8) < 0) { PyBuffer_Release(&v); PyBuffer_Release(&s); return NULL; }
    if (get_ints(ot, &t, 0, "tokens", 8) < 0) { PyBuffer_Release(&v); PyBuffer_Release(&s); PyBuffer_Release(&c); return NULL; }
    if (get_ints(oo, &o, 1, "out", 4 | 8) < 0) {
        PyBuffer_Release(&v); PyBuffer_Release(&s); PyBuffer_Release(&c); PyBuffer_Release(&t); return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t width = v.itemsize, nv = v.len / width, ns = s.len / 8, nc = c.len / c.itemsize;
    Py_ssize_t nt = t.len / 8, no = o.len / o.itemsize, pos = 0;
    if (o.itemsize != width) { PyErr_SetString(PyExc_TypeError, "out and values must hold integers of the same width"); goto done; }
    if (nc != ns) { PyErr_SetString(PyExc_ValueError, "starts and counts must have the same length"); goto done; }
    const int64_t *st = (const int64_t *)s.buf, *tok = (const int64_t *)t.buf;
    const char *src = (const char *)v.buf;
    char *dst = (char *)o.buf;
    for (Py_ssize_t i = 0; i < nt; i++) {
        int64_t k = tok[i];
        if (k < 0 || k >= ns) { PyErr_Format(PyExc_IndexError, "token %lld is outside starts (%zd entries)", (long long)k, ns); goto done; }
        int64_t a = st[k], n = c.itemsize == 4 ? ((const int32_t *)c.buf)[k] : ((const int64_t *)c.buf)[k];
        if (a < 0 || n < 0 || a > nv - n) { PyErr_Format(PyExc_IndexError, "range %lld + %lld of token %lld is outside values (%zd)", (long long)a, (long long)n, (long long)k, nv); goto done; }
        if (n > no - pos) { PyErr_SetString(PyExc_ValueError, "out has no room for every value gathered"); goto done; }
        memcpy(dst + pos * width, src + a * width, (size_t)(n * width));
        pos += n;
    }
    result = PyLong_FromSsize_t(pos);
done:
    PyBuffer_Release(&v); PyBuffer_Release(&s); PyBuffer_Release(&c); PyBuffer_Release(&t); PyBuffer_Release(&o);
    return result;
}

/* gather_words(heads, data, slots, ids, sentence_words, fine, coarse, align, fine_lengths, coarse_lengths)
   -> None: a shard's tokens in one pass (the Chinese encoding, data_prep/chinese.py encode_shard).
   The worker's memo keeps each word's tokens in one block of ``data`` (int32): its fine ids, then its
   coarse ids, then their alignments; heads[2k] = the block's start, heads[2k + 1] = nf | nc << 32.
   Word i of the shard is memo word slots[ids[i]]; sentence s has sentence_words[s] words. Writes the
   fine ids, coarse ids and alignments of every word in order into fine / coarse / align (int32, exactly
   their totals) and each sentence's numbers of fine and coarse tokens into fine_lengths /
   coarse_lengths (int64). Per word two random reads (its head, its block) instead of nine in three
   gather_ranges passes (their starts, counts and values), the next words' heads prefetched; no index
   array. Every index and size is checked (IndexError / ValueError; the outputs are then partly written). */
static PyObject *gather_words(PyObject *self, PyObject *args) {
    PyObject *o[10];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9])) return NULL;
    static const char *names[10] = {"heads", "data", "slots", "ids", "sentence_words", "fine", "coarse", "align",
                                    "fine_lengths", "coarse_lengths"};
    static const int widths[10] = {8, 4, 8, 4 | 8, 8, 4, 4, 4, 8, 8};
    static const int writable[10] = {0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
    Py_buffer b[10];
    int got = 0;
    PyObject *result = NULL;
    for (; got < 10; got++)
        if (get_ints(o[got], &b[got], writable[got], names[got], widths[got]) < 0) goto done;
    const int64_t *heads = (const int64_t *)b[0].buf, *slots = (const int64_t *)b[2].buf, *sw = (const int64_t *)b[4].buf;
    const int32_t *data = (const int32_t *)b[1].buf;
    int32_t *fine = (int32_t *)b[5].buf, *coarse = (int32_t *)b[6].buf, *align = (int32_t *)b[7].buf;
    int64_t *flen = (int64_t *)b[8].buf, *clen = (int64_t *)b[9].buf;
    Py_ssize_t nwords = b[0].len / 16, ndata = b[1].len / 4, nslots = b[2].len / 8, nids = b[3].len / b[3].itemsize;
    Py_ssize_t nsent = b[4].len / 8, nf_out = b[5].len / 4, nc_out = b[6].len / 4;
    int ids64 = b[3].itemsize == 8;
    const int32_t *ids32 = (const int32_t *)b[3].buf;
    const int64_t *ids64p = (const int64_t *)b[3].buf;
    if (b[7].len / 4 != nc_out) { PyErr_SetString(PyExc_ValueError, "coarse and align must have the same length"); goto done; }
    if (b[8].len / 8 != nsent || b[9].len / 8 != nsent) { PyErr_SetString(PyExc_ValueError, "fine_lengths and coarse_lengths need one entry per sentence"); goto done; }
    Py_ssize_t i = 0, f = 0, c = 0;
#define GW_ID(j) (ids64 ? ids64p[j] : (int64_t)ids32[j])
    for (Py_ssize_t s = 0; s < nsent; s++) {
        int64_t n = sw[s];
        if (n < 0 || n > nids - i) { PyErr_Format(PyExc_ValueError, "sentence %zd has %lld words: more than the %zd ids left", s, (long long)n, nids - i); goto done; }
        Py_ssize_t f0 = f, c0 = c, end = i + (Py_ssize_t)n;
        for (; i < end; i++) {
            if (i + 16 < nids) {
                int64_t ahead = GW_ID(i + 16);
                if (ahead >= 0 && ahead < nslots) {
                    int64_t k2 = slots[ahead];
                    if (k2 >= 0 && k2 < nwords) __builtin_prefetch(heads + 2 * k2);
                }
            }
            int64_t id = GW_ID(i);
            if (id < 0 || id >= nslots) { PyErr_Format(PyExc_IndexError, "word id %lld is outside slots (%zd entries)", (long long)id, nslots); goto done; }
            int64_t k = slots[id];
            if (k < 0 || k >= nwords) { PyErr_Format(PyExc_IndexError, "slot %lld is outside heads (%zd words)", (long long)k, nwords); goto done; }
            int64_t start = heads[2 * k], sizes = heads[2 * k + 1];
            int64_t wf = sizes & 0xFFFFFFFF, wc = sizes >> 32;
            if (start < 0 || wf + 2 * wc > ndata - start) { PyErr_Format(PyExc_IndexError, "the block of word %lld (%lld + %lld) is outside data (%zd)", (long long)k, (long long)start, (long long)(wf + 2 * wc), ndata); goto done; }
            if (wf > nf_out - f || wc > nc_out - c) { PyErr_SetString(PyExc_ValueError, "fine / coarse have no room for every token gathered"); goto done; }
            const int32_t *blk = data + start;
            for (int64_t j = 0; j < wf; j++) fine[f + j] = blk[j];
            blk += wf;
            for (int64_t j = 0; j < wc; j++) { coarse[c + j] = blk[j]; align[c + j] = blk[wc + j]; }
            f += wf; c += wc;
        }
        flen[s] = f - f0; clen[s] = c - c0;
    }
#undef GW_ID
    if (i != nids || f != nf_out || c != nc_out) {
        PyErr_Format(PyExc_ValueError, "gathered %zd of %zd ids, %zd of %zd fine and %zd of %zd coarse tokens", i, nids, f, nf_out, c, nc_out);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    for (int j = 0; j < got; j++) PyBuffer_Release(&b[j]);
    return result;
}

/* ---- jieba in C (data_prep/chinese.py, JiebaCSegmenter: --segmenter jieba-c) ------------------------
   Jieba(dictionary, start, trans, emit) segments exactly as jieba 0.42's Tokenizer.cut(text) (HMM on):
   the same dictionary (jieba's dict.txt, given as its text), the same prefix-dictionary DAG and
   maximum-probability route, and the same HMM (finalseg: its start/transition/emission log
   probabilities, given as Python dicts) for runs of single characters outside the dictionary, with
   the same floating-point sums in the same order and the same tie-breaks. tests/test_native.py holds
   it equal to jieba word for word on People's Daily and on random text.

   Why: the build's words went from rjieba's list of new str objects (one per word) through the C
   numbering above; here the words are found as (start, end) spans of the text and numbered straight
   from its code points (``segment_sentences``), so only a word never seen before becomes a str.

   The dictionary is a trie: node 0 is the root; a root's child is looked up in a direct table for
   code points below 0x10000, any other child in an open-addressing table keyed by (parent, code
   point). Each node is a prefix of a dictionary word (jieba's FREQ holds every prefix, at 0) and
   carries the word's frequency (0: a prefix only), its log and whether it is a word jieba force-
   splits (a user word added with frequency 0). */

#define MIN_FLOAT (-3.14e100)
#define HAN_LO 0x4E00
#define HAN_HI 0x9FD5

/* A child: node -1 = none; logf: the log of its frequency, < 0 for a prefix only (the log of a
   frequency >= 1 is >= 0). A table entry holds both (16 bytes): the DAG's walk is bound by the latency
   of reading it (a random place in ~16 MB), one read a step. kn = key << NODE_BITS | node, key =
   (parent + 1) << 21 | code point; kn 0 = an empty slot. */
#define NODE_BITS 21
#define MAX_NODES ((1 << NODE_BITS) - 1)
typedef struct { double logf; int32_t node; } JChild;
typedef struct { uint64_t kn; double logf; } JEntry;

typedef struct {
    PyObject_HEAD
    JEntry *table;
    size_t mask, used;
    JChild *root;     /* the root's children, for code points < 0x10000 */
    int64_t *freq;
    uint8_t *force;
    Py_ssize_t forced;  /* words force-split */
    int32_t nodes, cap;
    int64_t total;
    double start[4], trans[4][4];  /* states B M E S */
    double *emit;                  /* [(c - HAN_LO) * 4 + state], c in HAN_LO..HAN_HI */
} Jieba;

static const JChild NO_CHILD = {-1.0, -1};

static inline uint64_t jb_key(int32_t node, Py_UCS4 c) { return ((uint64_t)(node + 1) << 21) | c; }

/* The table entry of (node, c), or NULL. */
static inline JEntry *jb_entry(const Jieba *j, uint64_t key) {
    size_t i = mix(key) & j->mask;
    while (j->table[i].kn) {
        if (j->table[i].kn >> NODE_BITS == key) return &j->table[i];
        i = (i + 1) & j->mask;
    }
    return NULL;
}

static inline JChild jb_step(const Jieba *j, int32_t node, Py_UCS4 c) {
    if (node == 0 && c < 0x10000) return j->root[c];
    const JEntry *e = jb_entry(j, jb_key(node, c));
    if (!e) return NO_CHILD;
    JChild child = {e->logf, (int32_t)(e->kn & MAX_NODES)};
    return child;
}

static inline int32_t jb_child(const Jieba *j, int32_t node, Py_UCS4 c) { return jb_step(j, node, c).node; }

static int jb_grow_nodes(Jieba *j) {
    int32_t cap = j->cap ? j->cap * 2 : 1 << 16;
    int64_t *freq = realloc(j->freq, cap * sizeof(int64_t));
    if (freq) j->freq = freq;
    uint8_t *force = realloc(j->force, cap);
    if (force) j->force = force;
    if (!freq || !force) { PyErr_NoMemory(); return -1; }
    j->cap = cap;
    return 0;
}

/* A zeroed table of cap entries on 2 MB pages where the kernel gives them (transparent huge pages on
   madvise): its reads land anywhere in ~16 MB, and with 4 KB pages most also missed the TLB. */
static JEntry *jb_new_table(size_t cap) {
    void *p = NULL;
    size_t bytes = cap * sizeof(JEntry), huge = (size_t)2 << 20;
    if (bytes >= huge && posix_memalign(&p, huge, bytes) == 0) {
#ifdef MADV_HUGEPAGE
        madvise(p, bytes, MADV_HUGEPAGE);
#endif
        memset(p, 0, bytes);
        return p;
    }
    return calloc(cap, sizeof(JEntry));
}

static int jb_grow_table(Jieba *j) {
    size_t cap = (j->mask + 1) * 2;
    JEntry *table = jb_new_table(cap);
    if (!table) { PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i <= j->mask; i++) {
        if (!j->table[i].kn) continue;
        size_t k = mix(j->table[i].kn >> NODE_BITS) & (cap - 1);
        while (table[k].kn) k = (k + 1) & (cap - 1);
        table[k] = j->table[i];
    }
    free(j->table);
    j->table = table; j->mask = cap - 1;
    return 0;
}

/* The node of c under node, created (frequency 0: a prefix) if missing. -1 on error. */
static int32_t jb_add_child(Jieba *j, int32_t node, Py_UCS4 c) {
    int32_t found = jb_child(j, node, c);
    if (found >= 0) return found;
    if (j->nodes >= MAX_NODES) {
        PyErr_Format(PyExc_ValueError, "the dictionary has more than %d prefixes of words: too many for jieba-c", MAX_NODES);
        return -1;
    }
    if (j->nodes == j->cap && jb_grow_nodes(j) < 0) return -1;
    int32_t id = j->nodes++;
    j->freq[id] = 0; j->force[id] = 0;
    if (node == 0 && c < 0x10000) { j->root[c].node = id; j->root[c].logf = -1.0; return id; }
    uint64_t key = jb_key(node, c);
    size_t i = mix(key) & j->mask;
    while (j->table[i].kn) i = (i + 1) & j->mask;
    j->table[i].kn = key << NODE_BITS | (uint64_t)id; j->table[i].logf = -1.0;
    if (++j->used * 2 > j->mask + 1 && jb_grow_table(j) < 0) return -1;
    return id;
}

/* jieba's FREQ[word] = freq (every prefix kept, at 0 if new); total += freq, as gen_pfdict and add_word. */
static int jb_set_word(Jieba *j, const Py_UCS4 *w, Py_ssize_t n, int64_t freq) {
    int32_t node = 0, parent = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        parent = node;
        if ((node = jb_add_child(j, node, w[i])) < 0) return -1;
    }
    if (node == 0) return 0;
    double logf = freq > 0 ? log((double)freq) : -1.0;
    if (parent == 0 && w[n - 1] < 0x10000) j->root[w[n - 1]].logf = logf;
    else jb_entry(j, jb_key(parent, w[n - 1]))->logf = logf;
    j->freq[node] = freq;
    if (freq == 0 && !j->force[node]) { j->force[node] = 1; j->forced++; }  /* finalseg.add_force_split: only add_word */
    j->total += freq;
    return 0;
}

/* The node of s[a:b], or -1 if it is not in FREQ. */
static int32_t jb_find(const Jieba *j, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b) {
    int32_t node = 0;
    for (Py_ssize_t i = a; i < b && node >= 0; i++) node = jb_child(j, node, s[i]);
    return node;
}

static void jb_dealloc(Jieba *j) {
    free(j->table); free(j->root); free(j->freq); free(j->force); free(j->emit);
    Py_TYPE(j)->tp_free((PyObject *)j);
}

static int jb_state(PyObject *key) {
    if (!PyUnicode_Check(key) || PyUnicode_GET_LENGTH(key) != 1) return -1;
    switch (PyUnicode_READ_CHAR(key, 0)) {
    case 'B': return 0; case 'M': return 1; case 'E': return 2; case 'S': return 3;
    default: return -1;
    }
}

/* A dict {state: float} into out[4] (missing states: MIN_FLOAT). */
static int jb_state_dict(PyObject *d, double *out, const char *name) {
    if (!PyDict_Check(d)) { PyErr_Format(PyExc_TypeError, "%s must be a dict of the states B M E S", name); return -1; }
    for (int s = 0; s < 4; s++) out[s] = MIN_FLOAT;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &k, &v)) {
        int s = jb_state(k);
        if (s < 0) { PyErr_Format(PyExc_ValueError, "%s: unknown state %R", name, k); return -1; }
        out[s] = PyFloat_AsDouble(v);
        if (out[s] == -1.0 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static int jb_init(Jieba *j, PyObject *args, PyObject *kwds) {
    PyObject *dictionary, *start, *trans, *emit;
    if (!PyArg_ParseTuple(args, "UO!O!O!", &dictionary, &PyDict_Type, &start, &PyDict_Type, &trans, &PyDict_Type, &emit))
        return -1;
    if (j->table) { PyErr_SetString(PyExc_RuntimeError, "Jieba is initialised once"); return -1; }
    j->mask = (1 << 20) - 1;
    j->table = jb_new_table(j->mask + 1);
    j->root = malloc(0x10000 * sizeof(JChild));
    j->emit = malloc((size_t)(HAN_HI - HAN_LO + 1) * 4 * sizeof(double));
    if (!j->table || !j->root || !j->emit || jb_grow_nodes(j) < 0) { PyErr_NoMemory(); return -1; }
    for (int c = 0; c < 0x10000; c++) j->root[c] = NO_CHILD;
    j->nodes = 1; j->freq[0] = 0; j->force[0] = 0;
    /* the HMM: start and transition log probabilities, then the emissions of the Chinese characters */
    if (jb_state_dict(start, j->start, "start") < 0) return -1;
    for (int s = 0; s < 4; s++) for (int t = 0; t < 4; t++) j->trans[s][t] = MIN_FLOAT;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(trans, &pos, &k, &v)) {
        int s = jb_state(k);
        if (s < 0) { PyErr_Format(PyExc_ValueError, "trans: unknown state %R", k); return -1; }
        if (jb_state_dict(v, j->trans[s], "trans") < 0) return -1;
    }
    for (Py_ssize_t i = 0; i < (HAN_HI - HAN_LO + 1) * 4; i++) j->emit[i] = MIN_FLOAT;
    pos = 0;
    while (PyDict_Next(emit, &pos, &k, &v)) {
        int s = jb_state(k);
        if (s < 0 || !PyDict_Check(v)) { PyErr_Format(PyExc_ValueError, "emit: unknown state %R (or not a dict)", k); return -1; }
        PyObject *ch, *p;
        Py_ssize_t pos2 = 0;
        while (PyDict_Next(v, &pos2, &ch, &p)) {
            if (!PyUnicode_Check(ch) || PyUnicode_GET_LENGTH(ch) != 1) { PyErr_SetString(PyExc_ValueError, "emit: keys must be characters"); return -1; }
            Py_UCS4 c = PyUnicode_READ_CHAR(ch, 0);
            if (c < HAN_LO || c > HAN_HI) continue;  /* the HMM only sees runs of these */
            double x = PyFloat_AsDouble(p);
            if (x == -1.0 && PyErr_Occurred()) return -1;
            j->emit[(c - HAN_LO) * 4 + s] = x;
        }
    }
    /* the dictionary, parsed as gen_pfdict: each line stripped, "word freq [tag]" */
    Py_ssize_t n = PyUnicode_GET_LENGTH(dictionary), a = 0, line = 0;
    Py_UCS4 *text = PyUnicode_AsUCS4Copy(dictionary);
    if (!text) return -1;
    while (a < n) {
        Py_ssize_t b = a;
        while (b < n && text[b] != '\n') b++;
        Py_ssize_t next = b + 1, s = a, e = b;
        line++;
        while (s < e && Py_UNICODE_ISSPACE(text[s])) s++;
        while (e > s && Py_UNICODE_ISSPACE(text[e - 1])) e--;
        Py_ssize_t sp = s;
        while (sp < e && text[sp] != ' ') sp++;
        int64_t freq = 0;
        Py_ssize_t f = sp + 1, digits = 0;
        for (; f < e && text[f] != ' '; f++, digits++) {
            if (text[f] < '0' || text[f] > '9' || digits > 15) { digits = -1; break; }
            freq = freq * 10 + (text[f] - '0');
        }
        if (sp >= e || digits <= 0 || sp == s) {
            PyMem_Free(text);
            PyErr_Format(PyExc_ValueError, "invalid dictionary entry at line %zd (not \"word freq [tag]\")", line);
            return -1;
        }
        if (jb_set_word(j, text + s, sp - s, freq) < 0) { PyMem_Free(text); return -1; }
        a = next;
    }
    PyMem_Free(text);
    for (int32_t i = 1; i < j->nodes; i++) j->force[i] = 0;  /* dict.txt entries at 0 are not force-split */
    j->forced = 0;
    return 0;
}

/* Spans (start, end) of the words found, appended to a growing int32 array. */
typedef struct { Py_ssize_t *v; Py_ssize_t n, cap; } Spans;

static int sp_add(Spans *sp, Py_ssize_t a, Py_ssize_t b) {
    if (sp->n + 2 > sp->cap) {
        Py_ssize_t cap = sp->cap ? sp->cap * 2 : 1024;
        Py_ssize_t *v = realloc(sp->v, cap * sizeof(Py_ssize_t));
        if (!v) { PyErr_NoMemory(); return -1; }
        sp->v = v; sp->cap = cap;
    }
    sp->v[sp->n++] = a; sp->v[sp->n++] = b;
    return 0;
}

static inline int ascii_alnum(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
static inline int is_han(Py_UCS4 c) { return c >= HAN_LO && c <= HAN_HI; }
/* jieba's re_han_default: [\u4E00-\u9FD5a-zA-Z0-9+#&\._%\-] */
static inline int is_han_default(Py_UCS4 c) {
    return is_han(c) || ascii_alnum(c) || c == '+' || c == '#' || c == '&' || c == '.' || c == '_' || c == '%' || c == '-';
}

/* finalseg.__cut: the Viterbi path of the Chinese run s[a:b] over B M E S, then its words. */
static int jb_viterbi(const Jieba *j, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b, Spans *out, uint8_t *back) {
    static const int prev[4][2] = {{2, 3}, {1, 0}, {0, 1}, {3, 2}};  /* PrevStatus B:ES M:MB E:BM S:SE */
    static const int letter[4] = {0, 2, 1, 3};                       /* B < E < M < S: max()'s tie-break */
    Py_ssize_t L = b - a;
    double V[4], W[4];
    const double *em = j->emit + (size_t)(s[a] - HAN_LO) * 4;
    for (int y = 0; y < 4; y++) V[y] = j->start[y] + em[y];
    for (Py_ssize_t t = 1; t < L; t++) {
        em = j->emit + (size_t)(s[a + t] - HAN_LO) * 4;
        for (int y = 0; y < 4; y++) {
            int p = prev[y][0], q = prev[y][1];
            double pp = V[p] + j->trans[p][y] + em[y], pq = V[q] + j->trans[q][y] + em[y];
            int take_q = pq > pp || (pq == pp && letter[q] > letter[p]);
            W[y] = take_q ? pq : pp;
            back[t * 4 + y] = (uint8_t)(take_q ? q : p);
        }
        memcpy(V, W, sizeof V);
    }
    int state = V[3] >= V[2] ? 3 : 2;  /* max over E, S: S on a tie */
    /* the path, backwards into back[t * 4] (slot 0 of each step is free once read) */
    for (Py_ssize_t t = L - 1; t >= 0; t--) {
        int here = state;
        if (t > 0) state = back[t * 4 + here];
        back[t * 4] = (uint8_t)here;
    }
    Py_ssize_t begin = 0, nexti = 0;
    for (Py_ssize_t i = 0; i < L; i++) {
        int pos = back[i * 4];
        if (pos == 0) begin = i;
        else if (pos == 2) {
            int32_t node = j->forced ? jb_find(j, s, a + begin, a + i + 1) : -1;
            if (node > 0 && j->force[node]) {
                for (Py_ssize_t c = a + begin; c <= a + i; c++) if (sp_add(out, c, c + 1) < 0) return -1;
            } else if (sp_add(out, a + begin, a + i + 1) < 0) return -1;
            nexti = i + 1;
        } else if (pos == 3) {
            if (sp_add(out, a + i, a + i + 1) < 0) return -1;
            nexti = i + 1;
        }
    }
    if (nexti < L && sp_add(out, a + nexti, b) < 0) return -1;
    return 0;
}

/* finalseg.cut of s[a:b]: Chinese runs through the HMM, the rest split by [a-zA-Z0-9]+(?:\.\d+)?%? */
static int jb_hmm(const Jieba *j, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b, Spans *out, uint8_t *back) {
    Py_ssize_t i = a;
    while (i < b) {
        Py_ssize_t k = i;
        if (is_han(s[i])) {
            while (k < b && is_han(s[k])) k++;
            if (jb_viterbi(j, s, i, k, out, back) < 0) return -1;
        } else {
            while (k < b && !is_han(s[k])) k++;
            Py_ssize_t piece = i, m = i;
            while (m < k) {
                if (!ascii_alnum(s[m])) { m++; continue; }
                Py_ssize_t e = m;
                while (e < k && ascii_alnum(s[e])) e++;
                if (e + 1 < k && s[e] == '.' && s[e + 1] >= '0' && s[e + 1] <= '9') {
                    e += 1;
                    while (e < k && s[e] >= '0' && s[e] <= '9') e++;
                }
                if (e < k && s[e] == '%') e++;
                if (piece < m && sp_add(out, piece, m) < 0) return -1;
                if (sp_add(out, m, e) < 0) return -1;
                piece = m = e;
            }
            if (piece < k && sp_add(out, piece, k) < 0) return -1;
        }
        i = k;
    }
    return 0;
}

/* A run of single-character route steps s[a:b] (__cut_DAG's buf). */
static int jb_flush(const Jieba *j, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b, Spans *out, uint8_t *back) {
    if (b - a == 1) return sp_add(out, a, b);
    int32_t node = jb_find(j, s, a, b);
    if (node < 0 || j->freq[node] == 0) return jb_hmm(j, s, a, b, out, back);
    for (Py_ssize_t c = a; c < b; c++) if (sp_add(out, c, c + 1) < 0) return -1;
    return 0;
}

/* __cut_DAG (hmm) or __cut_DAG_NO_HMM of the block s[a:b]; route/where: scratch of b - a + 1. */
static int jb_block(const Jieba *j, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b, int hmm, double logtotal,
                    double *route, Py_ssize_t *where, Spans *out, uint8_t *back) {
    Py_ssize_t N = b - a;
    route[N] = 0.0; where[N] = 0;
    for (Py_ssize_t idx = N - 1; idx >= 0; idx--) {
        /* The walks' first two table reads (most walks end by then), fetched ahead: the second step
           of the walk 6 positions on (the first is the root's direct table), and the third of the walk
           3 positions on, its second step being in cache by now. */
        if (idx >= 6 && s[a + idx - 6] < 0x10000) {
            int32_t first = j->root[s[a + idx - 6]].node;
            if (first >= 0) __builtin_prefetch(&j->table[mix(jb_key(first, s[a + idx - 5])) & j->mask]);
        }
        if (idx >= 3 && s[a + idx - 3] < 0x10000) {
            int32_t first = j->root[s[a + idx - 3]].node;
            if (first >= 0) {
                int32_t second = jb_step(j, first, s[a + idx - 2]).node;
                if (second >= 0) __builtin_prefetch(&j->table[mix(jb_key(second, s[a + idx - 1])) & j->mask]);
            }
        }
        double best = 0.0;
        Py_ssize_t bx = -1;
        int32_t node = 0;
        for (Py_ssize_t i = idx; i < N; i++) {
            JChild step = jb_step(j, node, s[a + i]);
            if ((node = step.node) < 0) break;
            if (step.logf >= 0) {
                double p = step.logf - logtotal + route[i + 1];
                if (bx < 0 || p >= best) { best = p; bx = i; }
            }
        }
        if (bx < 0) { best = 0.0 - logtotal + route[idx + 1]; bx = idx; }
        route[idx] = best; where[idx] = bx;
    }
    Py_ssize_t x = 0, buf = -1;
    while (x < N) {
        Py_ssize_t y = where[x] + 1;
        if (hmm ? y - x == 1 : (y - x == 1 && ascii_alnum(s[a + x]))) {
            if (buf < 0) buf = x;
        } else {
            if (buf >= 0) {
                if (hmm ? jb_flush(j, s, a + buf, a + x, out, back) < 0 : sp_add(out, a + buf, a + x) < 0) return -1;
                buf = -1;
            }
            if (sp_add(out, a + x, a + y) < 0) return -1;
        }
        x = y;
    }
    if (buf >= 0 && (hmm ? jb_flush(j, s, a + buf, a + N, out, back) < 0 : sp_add(out, a + buf, a + N) < 0)) return -1;
    return 0;
}

/* The work arrays of a segmentation (the route and the Viterbi back-pointers), kept across the
   sentences of one call. */
typedef struct { double *route; Py_ssize_t *where; uint8_t *back; Py_ssize_t cap; } Scratch;

static int sc_fit(Scratch *w, Py_ssize_t n) {
    if (n + 1 <= w->cap) return 0;
    Py_ssize_t cap = n + 1 > 2 * w->cap ? n + 1 : 2 * w->cap;
    double *route = realloc(w->route, cap * sizeof(double));
    if (route) w->route = route;
    Py_ssize_t *where = realloc(w->where, cap * sizeof(Py_ssize_t));
    if (where) w->where = where;
    uint8_t *back = realloc(w->back, cap * 4);
    if (back) w->back = back;
    if (!route || !where || !back) { PyErr_NoMemory(); return -1; }
    w->cap = cap;
    return 0;
}

static void sc_free(Scratch *w) { free(w->route); free(w->where); free(w->back); }

/* jieba.Tokenizer.cut(text, HMM=hmm) as spans of the UCS4 text s[0:n], appended to out. */
static int jb_spans_in(const Jieba *j, const Py_UCS4 *s, Py_ssize_t n, int hmm, Spans *out, Scratch *w) {
    if (sc_fit(w, n) < 0) return -1;
    double *route = w->route;
    Py_ssize_t *where = w->where;
    uint8_t *back = w->back;
    int rc = -1;
    double logtotal = log((double)j->total);
    Py_ssize_t i = 0;
    while (i < n) {
        if (is_han_default(s[i])) {
            Py_ssize_t k = i;
            while (k < n && is_han_default(s[k])) k++;
            if (jb_block(j, s, i, k, hmm, logtotal, route, where, out, back) < 0) goto done;
            i = k;
        } else if (s[i] == '\r' && i + 1 < n && s[i + 1] == '\n') {
            if (sp_add(out, i, i + 2) < 0) goto done;
            i += 2;
        } else {
            if (sp_add(out, i, i + 1) < 0) goto done;
            i++;
        }
    }
    rc = 0;
done:
    return rc;
}

static int jb_spans(const Jieba *j, const Py_UCS4 *s, Py_ssize_t n, int hmm, Spans *out) {
    Scratch w = {0};
    int rc = jb_spans_in(j, s, n, hmm, out, &w);
    sc_free(&w);
    return rc;
}

/* 0, or -1 with RuntimeError for a Jieba whose __init__ did not run (Jieba.__new__(Jieba)). */
static int jb_ready(const Jieba *j) {
    if (j->table) return 0;
    PyErr_SetString(PyExc_RuntimeError, "Jieba was not initialised (call Jieba(dictionary, start, trans, emit))");
    return -1;
}

static PyObject *jb_cut(Jieba *j, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"text", "hmm", NULL};
    if (jb_ready(j) < 0) return NULL;
    PyObject *text;
    int hmm = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|p", kwlist, &text, &hmm)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(text);
    if (!s) return NULL;
    Spans sp = {0};
    PyObject *words = NULL;
    if (jb_spans(j, s, n, hmm, &sp) < 0) goto done;
    words = PyList_New(sp.n / 2);
    if (!words) goto done;
    for (Py_ssize_t w = 0; w < sp.n / 2; w++) {
        PyObject *word = PyUnicode_Substring(text, sp.v[2 * w], sp.v[2 * w + 1]);
        if (!word) { Py_CLEAR(words); goto done; }
        PyList_SET_ITEM(words, w, word);
    }
done:
    PyMem_Free(s); free(sp.v);
    return words;
}

/* The id of the word text[a:b] (s: text's code points) in t, numbering it if new (then appended to
   added). Words of 1-4 characters below U+10000 through t's packed table, the others through its
   dict: a str is made only for a word the packed table does not hold. -1 on error. */
static Py_ssize_t wn_span(WordNumbers *t, PyObject *text, const Py_UCS4 *s, Py_ssize_t a, Py_ssize_t b, PyObject *added) {
    uint64_t key = 0;
    if (b - a <= 4) {
        for (Py_ssize_t i = a; i < b; i++) {
            if (s[i] == 0 || s[i] > 0xFFFF) { key = 0; break; }
            key |= (uint64_t)s[i] << (16 * (i - a));
        }
    }
    size_t slot = 0;
    if (key) {
        slot = mix(key) & t->mask;
        while (t->keys[slot] && t->keys[slot] != key) slot = (slot + 1) & t->mask;
        if (t->keys[slot]) return t->vals[slot];
    }
    PyObject *word = PyUnicode_Substring(text, a, b);
    if (!word) return -1;
    Py_ssize_t count = 0, id = dict_id(t, word, &count);
    if (id >= 0 && count && PyList_Append(added, word) < 0) id = -1;
    Py_DECREF(word);
    if (id < 0) return -1;
    if (key) {
        t->keys[slot] = key; t->vals[slot] = id;
        if (++t->used * 2 > t->mask + 1 && grow(t) < 0) return -1;
    }
    return id;
}

/* The id of "##" + text[a:b] (a continuation word), numbered through t's dict. -1 on error. */
static Py_ssize_t wn_continuation(WordNumbers *t, PyObject *text, Py_ssize_t a, Py_ssize_t b, PyObject *added) {
    PyObject *piece = PyUnicode_Substring(text, a, b);
    if (!piece) return -1;
    PyObject *word = PyUnicode_FromFormat("##%U", piece);
    Py_DECREF(piece);
    if (!word) return -1;
    Py_ssize_t count = 0, id = dict_id(t, word, &count);
    if (id >= 0 && count && PyList_Append(added, word) < 0) id = -1;
    Py_DECREF(word);
    return id;
}

/* segment_sentences(sentences, start, numbers, ids, lengths, pos) -> (stop, pos, new words): the
   Chinese build's words of sentences[start:] (data_prep/chinese.py segment_shard, its chunk path in
   one pass): each sentence cut (jieba's words; a sentence holds no line break, so cutting it alone is
   cutting it within the text), its space words dropped, a word that starts with an ASCII letter/digit
   right after one that ends with one (no space between: the segmenter cut a Latin run) numbered as
   "##" + the word, the others as they are, through the WordNumbers ``numbers``. Sentence i's ids go
   to ids[pos:] (int32), their count to lengths[i] (int64). Stops before a sentence the general path
   must take: one holding "##", one with a word holding a space or a line break (never from jieba
   after normalisation), or one without a word; ``stop`` is its index (len(sentences): all done), pos
   the ids written; ``new words``: the words numbered anew, in id order. */
static PyObject *jb_segment_sentences(Jieba *j, PyObject *args) {
    PyObject *sentences, *oids, *olens;
    WordNumbers *t;
    Py_ssize_t start, pos;
    if (jb_ready(j) < 0) return NULL;
    if (!PyArg_ParseTuple(args, "O!nO!OOn", &PyList_Type, &sentences, &start, &WordNumbersType, &t, &oids, &olens, &pos))
        return NULL;
    if (!t->keys) { PyErr_SetString(PyExc_RuntimeError, "WordNumbers was not initialised"); return NULL; }
    Py_ssize_t n = PyList_GET_SIZE(sentences);
    Py_buffer vi, vl;
    if (get_ints(oids, &vi, 1, "ids", 4) < 0) return NULL;
    if (get_ints(olens, &vl, 1, "lengths", 8) < 0) { PyBuffer_Release(&vi); return NULL; }
    PyObject *result = NULL, *added = PyList_New(0);
    Py_UCS4 *s = NULL;
    Py_ssize_t cap = 0, room = vi.len / 4, i = start;
    Spans sp = {0};
    Scratch w = {0};
    if (!added) goto done;
    if (vi.itemsize != 4 || vl.itemsize != 8 || vl.len / 8 < n || start < 0 || start > n || pos < 0 || pos > room) {
        PyErr_SetString(PyExc_ValueError, "segment_sentences: ids must be int32 and lengths int64 with an entry per "
                        "sentence; start and pos within them");
        goto done;
    }
    int32_t *ids = (int32_t *)vi.buf;
    int64_t *lengths = (int64_t *)vl.buf;
    for (; i < n; i++) {
        PyObject *text = PyList_GET_ITEM(sentences, i);
        if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "sentences must be str"); goto done; }
        Py_ssize_t len = PyUnicode_GET_LENGTH(text), count = 0;
        if (len + 1 > cap) {
            Py_UCS4 *grown = PyMem_Realloc(s, (len + 1) * sizeof(Py_UCS4));
            if (!grown) { PyErr_NoMemory(); goto done; }
            s = grown; cap = len + 1;
        }
        if (!PyUnicode_AsUCS4(text, s, cap, 0)) goto done;
        int general = 0;
        for (Py_ssize_t k = 0; k + 1 < len && !general; k++) general = s[k] == '#' && s[k + 1] == '#';
        sp.n = 0;
        if (!general && jb_spans_in(j, s, len, 1, &sp, &w) < 0) goto done;
        int prev_alnum = 0;
        for (Py_ssize_t k = 0; k < sp.n / 2 && !general; k++) {
            Py_ssize_t a = sp.v[2 * k], b = sp.v[2 * k + 1];
            if (b - a == 1 && s[a] == ' ') { prev_alnum = 0; continue; }
            for (Py_ssize_t c = a; c < b && !general; c++) general = s[c] == ' ' || s[c] == '\n';
            if (general) break;
            if (pos + count >= room) { PyErr_SetString(PyExc_ValueError, "segment_sentences: ids has no room"); goto done; }
            int cont = prev_alnum && ascii_alnum(s[a]);
            prev_alnum = ascii_alnum(s[b - 1]);
            Py_ssize_t id = cont ? wn_continuation(t, text, a, b, added) : wn_span(t, text, s, a, b, added);
            if (id < 0) goto done;
            if (id > INT32_MAX) { PyErr_SetString(PyExc_OverflowError, "segment_sentences: word id beyond int32"); goto done; }
            ids[pos + count++] = (int32_t)id;
        }
        if (general || count == 0) break;
        lengths[i] = count;
        pos += count;
    }
    result = Py_BuildValue("nnO", i, pos, added);
done:
    PyMem_Free(s); free(sp.v); sc_free(&w); Py_XDECREF(added);
    PyBuffer_Release(&vi); PyBuffer_Release(&vl);
    return result;
}

/* add_word(word, freq): jieba's add_word with a given frequency (FREQ, prefixes, total; 0: force-split). */
static PyObject *jb_add_word(Jieba *j, PyObject *args) {
    PyObject *word;
    long long freq;
    if (jb_ready(j) < 0 || !PyArg_ParseTuple(args, "UL", &word, &freq)) return NULL;
    if (freq < 0) { PyErr_SetString(PyExc_ValueError, "freq must be >= 0"); return NULL; }
    Py_UCS4 *w = PyUnicode_AsUCS4Copy(word);
    if (!w) return NULL;
    int rc = jb_set_word(j, w, PyUnicode_GET_LENGTH(word), freq);
    PyMem_Free(w);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

/* get(word) -> FREQ.get(word): its frequency (0: a prefix of a word only), None if not in FREQ. */
static PyObject *jb_get(Jieba *j, PyObject *word) {
    if (jb_ready(j) < 0) return NULL;
    if (!PyUnicode_Check(word)) { PyErr_SetString(PyExc_TypeError, "word must be str"); return NULL; }
    Py_UCS4 *w = PyUnicode_AsUCS4Copy(word);
    if (!w) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(word);
    int32_t node = n ? jb_find(j, w, 0, n) : -1;
    PyMem_Free(w);
    if (node <= 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(j->freq[node]);
}

static PyObject *jb_total(Jieba *j, void *closure) { return PyLong_FromLongLong(j->total); }

/* ---- jieba-c's built dictionary as bytes (data_prep/chinese.py keeps it in a disk cache) ----------
   state() -> bytes: the table, the root's children, the frequencies, force-split marks and HMM tables
   as they are in memory; Jieba.from_state(buffer) makes the same object from them without parsing
   dict.txt (~0.2 s -> ~0.01 s a process). Native byte order and struct layout: the header records
   the sizes, and a state from another build of this file (JB_STATE_VERSION) is refused. from_state
   checks every size, that each node id is one of the nodes and that the table has its free slots,
   so a damaged buffer gives ValueError, never a read out of bounds (the caller's checksum catches
   a damaged number). */
#define JB_STATE_MAGIC 0x3143424a54424d41ULL  /* "AMBTJBC1" */
#define JB_STATE_VERSION 1
#define JB_EMIT ((size_t)(HAN_HI - HAN_LO + 1) * 4)
typedef struct {
    uint64_t magic, version, entry_size, child_size, mask, used;
    int64_t total, forced, nodes, emit;
    double start[4], trans[4][4];
} JStateHeader;

static size_t jb_state_bytes(size_t mask, size_t nodes) {
    return sizeof(JStateHeader) + (mask + 1) * sizeof(JEntry) + 0x10000 * sizeof(JChild)
           + nodes * (sizeof(int64_t) + 1) + JB_EMIT * sizeof(double);
}

static PyObject *jb_dump_state(Jieba *j, PyObject *unused) {
    if (jb_ready(j) < 0) return NULL;
    size_t nodes = (size_t)j->nodes;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)jb_state_bytes(j->mask, nodes));
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    JStateHeader h;
    memset(&h, 0, sizeof h);
    h.magic = JB_STATE_MAGIC; h.version = JB_STATE_VERSION; h.entry_size = sizeof(JEntry); h.child_size = sizeof(JChild);
    h.mask = j->mask; h.used = j->used; h.total = j->total; h.forced = j->forced; h.nodes = j->nodes; h.emit = (int64_t)JB_EMIT;
    memcpy(h.start, j->start, sizeof h.start); memcpy(h.trans, j->trans, sizeof h.trans);
    memcpy(p, &h, sizeof h); p += sizeof h;
    memcpy(p, j->table, (j->mask + 1) * sizeof(JEntry)); p += (j->mask + 1) * sizeof(JEntry);
    for (int c = 0; c < 0x10000; c++, p += sizeof(JChild)) {  /* field by field: no padding bytes */
        JChild child;
        memset(&child, 0, sizeof child);
        child.logf = j->root[c].logf; child.node = j->root[c].node;
        memcpy(p, &child, sizeof child);
    }
    memcpy(p, j->freq, nodes * sizeof(int64_t)); p += nodes * sizeof(int64_t);
    memcpy(p, j->force, nodes); p += nodes;
    memcpy(p, j->emit, JB_EMIT * sizeof(double));
    return out;
}

static PyObject *jb_from_state(PyTypeObject *type, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Jieba *j = NULL;
    const char *p = view.buf, *why = NULL;
    JStateHeader h;
    if ((size_t)view.len < sizeof h) { why = "shorter than its header"; goto bad; }
    memcpy(&h, p, sizeof h);
    if (h.magic != JB_STATE_MAGIC) { why = "not a jieba-c state"; goto bad; }
    if (h.version != JB_STATE_VERSION || h.entry_size != sizeof(JEntry) || h.child_size != sizeof(JChild) || h.emit != (int64_t)JB_EMIT) {
        why = "written by another version of data_prep/_native.c"; goto bad;
    }
    if (h.mask < 1 || h.mask > ((size_t)1 << 30) - 1 || (h.mask & (h.mask + 1)) || h.used * 2 > h.mask + 1
        || h.nodes < 1 || h.nodes > MAX_NODES || h.forced < 0 || h.forced > h.nodes) { why = "its sizes are out of range"; goto bad; }
    if ((size_t)view.len != jb_state_bytes(h.mask, (size_t)h.nodes)) { why = "its length does not match its header"; goto bad; }
    p += sizeof h;
    const JEntry *table = (const void *)p;
    size_t used = 0;
    for (size_t i = 0; i <= h.mask; i++) {
        uint64_t kn;
        memcpy(&kn, (const char *)(table + i), sizeof kn);
        if (!kn) continue;
        used++;
        int64_t node = (int64_t)(kn & MAX_NODES);
        if (node < 1 || node >= h.nodes) { why = "a table entry names no node"; goto bad; }
    }
    if (used != h.used) { why = "its table does not hold the entries its header counts"; goto bad; }
    const char *root = p + (h.mask + 1) * sizeof(JEntry);
    for (int c = 0; c < 0x10000; c++) {
        JChild child;
        memcpy(&child, root + (size_t)c * sizeof(JChild), sizeof child);
        if (child.node != -1 && (child.node < 1 || child.node >= h.nodes)) { why = "a child of the root names no node"; goto bad; }
    }
    j = (Jieba *)type->tp_alloc(type, 0);
    if (!j) { PyBuffer_Release(&view); return NULL; }
    int32_t cap = 1 << 16;
    while (cap < h.nodes) cap *= 2;
    j->table = jb_new_table(h.mask + 1);
    j->root = malloc(0x10000 * sizeof(JChild));
    j->freq = malloc((size_t)cap * sizeof(int64_t));
    j->force = malloc((size_t)cap);
    j->emit = malloc(JB_EMIT * sizeof(double));
    if (!j->table || !j->root || !j->freq || !j->force || !j->emit) { PyErr_NoMemory(); goto fail; }
    j->mask = h.mask; j->used = h.used; j->total = h.total; j->forced = h.forced; j->nodes = (int32_t)h.nodes; j->cap = cap;
    memcpy(j->start, h.start, sizeof h.start); memcpy(j->trans, h.trans, sizeof h.trans);
    memcpy(j->table, p, (h.mask + 1) * sizeof(JEntry)); p += (h.mask + 1) * sizeof(JEntry);
    memcpy(j->root, p, 0x10000 * sizeof(JChild)); p += 0x10000 * sizeof(JChild);
    memcpy(j->freq, p, (size_t)h.nodes * sizeof(int64_t)); p += (size_t)h.nodes * sizeof(int64_t);
    memcpy(j->force, p, (size_t)h.nodes); p += h.nodes;
    memcpy(j->emit, p, JB_EMIT * sizeof(double));
    PyBuffer_Release(&view);
    return (PyObject *)j;
bad:
    PyErr_Format(PyExc_ValueError, "not a usable jieba-c state: %s", why);
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(j);
    return NULL;
}

static PyMethodDef jb_methods[] = {
    {"cut", (PyCFunction)(void (*)(void))jb_cut, METH_VARARGS | METH_KEYWORDS, "cut(text, hmm=True) -> jieba's words of text"},
    {"segment_sentences", (PyCFunction)jb_segment_sentences, METH_VARARGS,
     "segment_sentences(sentences, start, numbers, ids, lengths, pos) -> (stop, pos, new words): the build's words of each sentence"},
    {"add_word", (PyCFunction)jb_add_word, METH_VARARGS, "add_word(word, freq): jieba's add_word with a frequency"},
    {"get", (PyCFunction)jb_get, METH_O, "get(word) -> jieba's FREQ.get(word)"},
    {"state", (PyCFunction)jb_dump_state, METH_NOARGS, "state() -> bytes: the built dictionary and HMM tables (Jieba.from_state)"},
    {"from_state", (PyCFunction)(void (*)(void))jb_from_state, METH_O | METH_CLASS,
     "Jieba.from_state(buffer) -> the Jieba whose state() gave buffer (ValueError if it is damaged or from another version)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef jb_getset[] = {{"total", (getter)jb_total, NULL, "jieba's total frequency", NULL}, {NULL}};

static PyTypeObject JiebaType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "data_prep._native.Jieba",
    .tp_basicsize = sizeof(Jieba),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Jieba(dictionary_text, start, trans, emit): jieba 0.42's segmentation in C (see the comment in _native.c)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)jb_init,
    .tp_dealloc = (destructor)jb_dealloc,
    .tp_methods = jb_methods,
    .tp_getset = jb_getset,
};

/* ---- summing packed count tables (data_prep/languages.py, sum_count_tables) ------------------------
   sum_tables(keys, values) -> (keys, values bytes): tables given as their keys joined by NUL (a str) and
   their counts (int64 arrays, one per key; an empty array: no key at all), summed key by key, keys in
   first-seen order (the tables in order, each in its order), joined by NUL again, the sums as the bytes
   of an int64 array. Keys are hashed from their code points, so no str is made per key: a Chinese
   build's two workers' word tables (~400k words each) summed in ~0.1 s instead of ~0.5 s through the
   numbering's dict. The caller keeps the sums below 2**62 (no overflow check here). */
typedef struct { uint64_t hash; int64_t start, len, out; } SumEntry;
typedef struct { Py_UCS4 *chars; int64_t *sums; SumEntry *slots; size_t cap, room, nchars, used, kept; } SumTable;

/* Room for one more key of n characters (the arrays grow by doubling: memory follows the distinct keys,
   not the keys given). -1 on error. */
static int st_reserve(SumTable *t, Py_ssize_t n) {
    if (t->nchars + (size_t)n + 1 > t->room) {
        size_t room = t->room * 2 > t->nchars + (size_t)n + 1 ? t->room * 2 : t->nchars + (size_t)n + 1;
        Py_UCS4 *chars = PyMem_Realloc(t->chars, room * sizeof(Py_UCS4));
        if (!chars) { PyErr_NoMemory(); return -1; }
        t->chars = chars; t->room = room;
    }
    if (t->used + 1 > t->kept) {
        size_t kept = t->kept * 2;
        int64_t *sums = PyMem_Realloc(t->sums, kept * sizeof(int64_t));
        if (!sums) { PyErr_NoMemory(); return -1; }
        t->sums = sums; t->kept = kept;
    }
    if ((t->used + 1) * 2 > t->cap) {
        size_t cap = t->cap * 2;
        SumEntry *slots = PyMem_Calloc(cap, sizeof(SumEntry));
        if (!slots) { PyErr_NoMemory(); return -1; }
        for (size_t i = 0; i < t->cap; i++) {
            if (!t->slots[i].hash) continue;
            size_t j = t->slots[i].hash & (cap - 1);
            while (slots[j].hash) j = (j + 1) & (cap - 1);
            slots[j] = t->slots[i];
        }
        PyMem_Free(t->slots);
        t->slots = slots; t->cap = cap;
    }
    return 0;
}

static PyObject *sum_tables(PyObject *self, PyObject *args) {
    PyObject *okeys, *ovalues;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &okeys, &PyList_Type, &ovalues)) return NULL;
    Py_ssize_t tables = PyList_GET_SIZE(okeys);
    if (PyList_GET_SIZE(ovalues) != tables) { PyErr_SetString(PyExc_ValueError, "keys and values must have one entry per table"); return NULL; }
    SumTable t = {PyMem_Malloc(1024 * sizeof(Py_UCS4)), PyMem_Malloc(1024 * sizeof(int64_t)),
                  PyMem_Calloc(1024, sizeof(SumEntry)), 1024, 1024, 0, 0, 1024};
    PyObject *result = NULL;
    if (!t.chars || !t.sums || !t.slots) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t k = 0; k < tables; k++) {
        PyObject *text = PyList_GET_ITEM(okeys, k);
        if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "keys must be str"); goto done; }
        Py_buffer v;
        if (get_ints(PyList_GET_ITEM(ovalues, k), &v, 0, "values", 8) < 0) goto done;
        const int64_t *vals = (const int64_t *)v.buf;
        Py_ssize_t nv = v.len / 8, n = PyUnicode_GET_LENGTH(text), key = 0, a = 0;
        if (!nv) { PyBuffer_Release(&v); continue; }  /* an empty table (its keys: "") */
        int kind = PyUnicode_KIND(text);
        const void *data = PyUnicode_DATA(text);
        for (Py_ssize_t i = 0; i <= n && key < nv; i++) {
            if (i < n && PyUnicode_READ(kind, data, i) != 0) continue;
            /* the key text[a:i]: hashed, then found among the keys kept so far, or kept */
            uint64_t h = TI_SEED;
            for (Py_ssize_t c = a; c < i; c++) h = ti_step(h, PyUnicode_READ(kind, data, c));
            h = ti_final(h, i - a) | 1;  /* (0 marks an empty slot) */
            if (st_reserve(&t, i - a) < 0) { PyBuffer_Release(&v); goto done; }
            for (size_t j = h & (t.cap - 1);; j = (j + 1) & (t.cap - 1)) {
                SumEntry *e = &t.slots[j];
                if (!e->hash) {
                    e->hash = h; e->start = (int64_t)t.nchars; e->len = i - a; e->out = (int64_t)t.used;
                    for (Py_ssize_t c = a; c < i; c++) t.chars[t.nchars++] = PyUnicode_READ(kind, data, c);
                    t.chars[t.nchars++] = 0;
                    t.sums[t.used++] = vals[key];
                    break;
                }
                if (e->hash == h && e->len == i - a) {
                    Py_ssize_t c = 0;
                    while (c < e->len && t.chars[e->start + c] == PyUnicode_READ(kind, data, a + c)) c++;
                    if (c == e->len) { t.sums[e->out] += vals[key]; break; }
                }
            }
            key++;
            a = i + 1;
        }
        PyBuffer_Release(&v);
        if (key != nv || a <= n) {
            PyErr_Format(PyExc_ValueError, "table %zd: its keys and its %zd values do not pair up", k, nv);
            goto done;
        }
    }
    PyObject *joined = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, t.chars, t.nchars ? (Py_ssize_t)t.nchars - 1 : 0);
    if (!joined) goto done;
    PyObject *counts = PyBytes_FromStringAndSize((const char *)t.sums, (Py_ssize_t)(t.used * sizeof(int64_t)));
    if (!counts) { Py_DECREF(joined); goto done; }
    result = Py_BuildValue("NN", joined, counts);
done:
    PyMem_Free(t.chars); PyMem_Free(t.sums); PyMem_Free(t.slots);
    return result;
}

/* ---- whitespace clean-up (data_prep/normalize.py, _normalize_batch and normalize_text) -----------------
   clean_spaces(text, wordlike) -> text: each run of whitespace other than the line break
   (Py_UNICODE_ISSPACE, as the pattern [^\S\n]+) becomes one space; with ``wordlike`` (Chinese) that space
   then becomes a line break after a "." (". " -> ".\n", a sentence end), stays between two ASCII
   letters/digits ("Windows 98") and is dropped anywhere else: the regular expressions _SPACES,
   _PERIOD_SPACE and _NON_WORD_SPACE in one pass (their three passes took ~0.5 s on 33 MB of text with
   spaces, a pre-segmented corpus among it). tests/test_native.py holds both equal on random text. */
static inline int space_not_break(Py_UCS4 c) { return c != '\n' && Py_UNICODE_ISSPACE(c); }
static inline int ascii_alnum_char(Py_UCS4 c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

/* The clean-up of buf[0:n] in place (it never grows: one character out at most per one read); -> the new length. */
static Py_ssize_t clean_spaces_in(Py_UCS4 *buf, Py_ssize_t n, int wordlike) {
    Py_ssize_t o = 0, i = 0;
    while (i < n) {
        Py_UCS4 c = buf[i];
        if (!space_not_break(c)) { buf[o++] = c; i++; continue; }
        Py_ssize_t j = i + 1;
        while (j < n && space_not_break(buf[j])) j++;
        if (!wordlike) {
            buf[o++] = ' ';
        } else if (o && buf[o - 1] == '.') {
            buf[o++] = '\n';
        } else if (o && ascii_alnum_char(buf[o - 1]) && j < n && ascii_alnum_char(buf[j])) {
            buf[o++] = ' ';
        }
        i = j;
    }
    return o;
}

static PyObject *clean_spaces(PyObject *self, PyObject *args) {
    PyObject *text;
    int wordlike;
    if (!PyArg_ParseTuple(args, "Up", &text, &wordlike)) return NULL;
    Py_UCS4 *buf = PyUnicode_AsUCS4Copy(text);
    if (!buf) return NULL;
    Py_ssize_t o = clean_spaces_in(buf, PyUnicode_GET_LENGTH(text), wordlike);
    PyObject *result = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, o);
    PyMem_Free(buf);
    return result;
}

/* ---- normalisation (data_prep/normalize.py, normalize_documents) ------------------------------------
   normalize_fast(documents, kinds, map_starts, map_data, wordlike) -> (texts, fallback): normalize_text of
   each document in one pass over its characters, from a table per BMP code point that normalize.py builds
   from unicodedata (_fast_tables; kinds: a byte for each code point below its length, 0x10000 or more): NK_KEEP (NFKC leaves it, and nothing next to
   it, as it is), NK_MAP (NFKC maps it alone to map_data[map_starts[c]:map_starts[c + 1]], KEEP or SPACE
   characters, whatever is around it: "１" -> "1", "…" -> "...", U+3000 -> " "), NK_BREAK (a line break
   -> "\n"; "\r\n" -> "\n"), NK_DROP (a control character, removed), NK_SPACE (whitespace other than
   "\n": clean_spaces_in does the rest), NK_UNSAFE (anything NFKC might change together with its
   neighbours: combining marks and what they compose with, Hangul jamo; surrogates; and every code point
   beyond the table). A document holding an unsafe character is left as it is in texts and its index put
   in fallback: normalize.py takes those through the general path. */
enum { NK_UNSAFE = 0, NK_KEEP = 1, NK_MAP = 2, NK_BREAK = 3, NK_DROP = 4, NK_SPACE = 5 };

static PyObject *normalize_fast(PyObject *self, PyObject *args) {
    PyObject *documents, *starts_obj, *data_obj;
    Py_buffer kinds_view, starts, data;
    int wordlike;
    if (!PyArg_ParseTuple(args, "Oy*OOp", &documents, &kinds_view, &starts_obj, &data_obj, &wordlike)) return NULL;
    PyObject *seq = NULL, *texts = NULL, *fallback = NULL, *result = NULL;
    Py_UCS4 *buf = NULL;
    int have_starts = 0, have_data = 0;
    Py_ssize_t size = kinds_view.len;  /* code points with a kind */
    if (size < 0x10000 || size > 0x110000) {
        PyErr_SetString(PyExc_ValueError, "kinds must hold a byte for each of 0x10000 to 0x110000 code points"); goto done;
    }
    if (get_ints(starts_obj, &starts, 0, "map_starts", 4) < 0) goto done;
    have_starts = 1;
    if (get_ints(data_obj, &data, 0, "map_data", 4) < 0) goto done;
    have_data = 1;
    if (starts.len / 4 != size + 1) { PyErr_SetString(PyExc_ValueError, "map_starts must hold len(kinds) + 1 offsets"); goto done; }
    const uint8_t *kinds = (const uint8_t *)kinds_view.buf;
    const int32_t *ms = (const int32_t *)starts.buf, *md = (const int32_t *)data.buf;
    Py_ssize_t data_n = data.len / 4, longest_map = 1;
    for (Py_ssize_t c = 0; c < size; c++) {  /* every mapping checked once: in range, to KEEP / SPACE only */
        if (ms[c + 1] < ms[c] || ms[c] < 0 || ms[c + 1] > data_n) {
            PyErr_SetString(PyExc_ValueError, "map_starts out of range"); goto done;
        }
        if (ms[c + 1] - ms[c] > longest_map) longest_map = ms[c + 1] - ms[c];
        for (int32_t k = ms[c]; k < ms[c + 1]; k++)
            if (md[k] < 0 || md[k] >= size || (kinds[md[k]] != NK_KEEP && kinds[md[k]] != NK_SPACE)) {
                PyErr_SetString(PyExc_ValueError, "map_data holds a character that is not KEEP or SPACE"); goto done;
            }
    }
    seq = PySequence_Fast(documents, "documents must be a sequence");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), cap = 0;
    texts = PyList_New(n);
    fallback = PyList_New(0);
    if (!texts || !fallback) goto done;
    for (Py_ssize_t d = 0; d < n; d++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, d);
        if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "documents must be str"); goto done; }
        Py_ssize_t len = PyUnicode_GET_LENGTH(text), o = 0;
        int kind = PyUnicode_KIND(text), spaces = 0, safe = kind != PyUnicode_4BYTE_KIND || size > 0x10000;  /* (UCS-4: beyond the BMP) */
        const void *src = PyUnicode_DATA(text);
        if (safe && len * longest_map > cap) {
            cap = len * longest_map;
            PyMem_Free(buf);
            buf = PyMem_Malloc((size_t)(cap ? cap : 1) * sizeof(Py_UCS4));
            if (!buf) { PyErr_NoMemory(); goto done; }
        }
        for (Py_ssize_t i = 0; safe && i < len; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, src, i);
            switch (c < size ? kinds[c] : NK_UNSAFE) {
            case NK_KEEP: buf[o++] = c; break;
            case NK_MAP:
                for (int32_t k = ms[c]; k < ms[c + 1]; k++) {
                    buf[o++] = (Py_UCS4)md[k];
                    spaces |= kinds[md[k]] == NK_SPACE;
                }
                break;
            case NK_BREAK:
                if (!(c == '\r' && i + 1 < len && PyUnicode_READ(kind, src, i + 1) == '\n')) buf[o++] = '\n';
                break;
            case NK_DROP: break;
            case NK_SPACE: buf[o++] = c; spaces = 1; break;
            default: safe = 0;
            }
        }
        PyObject *out;
        if (!safe) {
            PyObject *index = PyLong_FromSsize_t(d);
            if (!index || PyList_Append(fallback, index) < 0) { Py_XDECREF(index); goto done; }
            Py_DECREF(index);
            out = Py_NewRef(text);
        } else {
            if (spaces) o = clean_spaces_in(buf, o, wordlike);
            out = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, o);
            if (!out) goto done;
        }
        PyList_SET_ITEM(texts, d, out);
    }
    result = PyTuple_Pack(2, texts, fallback);
done:
    PyMem_Free(buf);
    Py_XDECREF(seq); Py_XDECREF(texts); Py_XDECREF(fallback);
    PyBuffer_Release(&kinds_view);
    if (have_starts) PyBuffer_Release(&starts);
    if (have_data) PyBuffer_Release(&data);
    return result;
}

/* ---- English words (data_prep/english.py, words_of) -------------------------------------------------
   english_words(text) -> text's words as _WORD_RE.findall(text) gives them, the pattern
   [CJK]|[^\W_CJK]+|[^\w\s]|_ (CJK: U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF, U+20000-2FFFF): a CJK
   character alone, a run of word characters other than "_" and CJK, any other character that is not
   white space alone. \w and \s as the re module has them for str patterns (Modules/_sre: alnum, i.e.
   alpha, decimal, digit or numeric, or "_"; Py_UNICODE_ISSPACE). One scan instead of the pattern's
   negated classes tried at each character: the English analysis's 4M words of BBC News x4 in
   ~0.2 s instead of ~2.5 s. */
static inline int en_cjk(Py_UCS4 c) {
    return (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0xF900 && c <= 0xFAFF)
           || (c >= 0x20000 && c <= 0x2FFFF);
}
static inline int en_word(Py_UCS4 c) { return c < 128 ? (ascii_alnum(c) || c == '_') : (Py_UNICODE_ISALNUM(c) || c == '_'); }
static inline int en_run(Py_UCS4 c) { return c != '_' && !en_cjk(c) && en_word(c); }

static inline int en_space(Py_UCS4 c) {
    return c < 128 ? (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) : Py_UNICODE_ISSPACE(c);
}

/* english_words(text, join=False): the words as a list, or with join=True (the joined words, how many):
   "w1 w2 ..." in one str (no word holds white space, so str.split(" ") gives the words back), for the
   analysis, which writes each sentence as that line (no str a word). */
static PyObject *english_words(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"text", "join", NULL};
    PyObject *text;
    int join = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|p", names, &text, &join)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0, count = 0, used = 0;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    PyObject *out = join ? NULL : PyList_New(0);
    Py_UCS4 *line = join ? PyMem_Malloc((size_t)(2 * n + 1) * sizeof(Py_UCS4)) : NULL;
    if (join ? !line : !out) { Py_XDECREF(out); return PyErr_NoMemory(); }
    while (i < n) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        Py_ssize_t j = i + 1;
        if (en_run(c)) {
            while (j < n && en_run(PyUnicode_READ(kind, data, j))) j++;
        } else if (c != '_' && !en_cjk(c) && en_space(c)) {
            i = j;  /* white space: no word */
            continue;
        }
        if (join) {
            if (count) line[used++] = ' ';
            for (Py_ssize_t k = i; k < j; k++) line[used++] = PyUnicode_READ(kind, data, k);
        } else {
            PyObject *w = PyUnicode_Substring(text, i, j);
            if (!w || PyList_Append(out, w) < 0) { Py_XDECREF(w); Py_DECREF(out); return NULL; }
            Py_DECREF(w);
        }
        count++;
        i = j;
    }
    if (!join) return out;
    PyObject *joined = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, line, used);
    PyMem_Free(line);
    if (!joined) return NULL;
    return Py_BuildValue("(Nn)", joined, count);
}

/* english_sentences(text) -> data_prep.english.split_sentences(text): the sentences of a paragraph.
   A sentence ends where _SENTENCE_END_RE matches, [.!?]+ then closing quotes/brackets, then white space,
   before something that can start a sentence (opening quotes/brackets, then [A-Z0-9]), unless the last
   12 characters before the white space end as _NO_BREAK_AFTER says (an abbreviation or a single capital
   letter, after a word boundary, then "." and closers). Each piece is stripped, empty ones dropped.
   The match is deterministic (no alternative of the pattern can succeed where the greedy one fails), so
   one scan finds what re.finditer finds; tests/test_data_prep_en.py compares them on random text. */
static const char *const EN_NO_BREAK[] = {
    "Mr", "Mrs", "Ms", "Dr", "Prof", "Sr", "Jr", "St", "Mt", "vs", "etc", "e.g", "i.e", "No", "Vol", "Fig", "Inc", "Ltd",
    "Co", "Corp", "Gen", "Gov", "Sen", "Rep", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov",
    "Dec", NULL};

static inline int en_closer(Py_UCS4 c) { return c == '"' || c == '\'' || c == 0x201D || c == 0x2019 || c == ')' || c == ']'; }
static inline int en_opener(Py_UCS4 c) { return c == '"' || c == '\'' || c == 0x201C || c == 0x2018 || c == '(' || c == '['; }

/* _NO_BREAK_AFTER.search(text[a:b]) (b - a <= 12; "\b" counts the slice's start as a boundary). */
static int en_no_break(int kind, const void *d, Py_ssize_t a, Py_ssize_t b) {
    Py_ssize_t q = b;
    while (q > a && en_closer(PyUnicode_READ(kind, d, q - 1))) q--;
    if (q <= a) return 0;
    q--;  /* the last character before the closers: it must be the "." */
    if (PyUnicode_READ(kind, d, q) != '.') return 0;
    for (const char *const *w = EN_NO_BREAK; *w; w++) {
        Py_ssize_t n = (Py_ssize_t)strlen(*w), k;
        if (q - a < n) continue;
        for (k = 0; k < n && PyUnicode_READ(kind, d, q - n + k) == (Py_UCS4)(unsigned char)(*w)[k]; k++) {}
        if (k == n && (q - n == a || !en_word(PyUnicode_READ(kind, d, q - n - 1)))) return 1;
    }
    if (q - a >= 1) {
        Py_UCS4 c = PyUnicode_READ(kind, d, q - 1);
        if (c >= 'A' && c <= 'Z' && (q - 1 == a || !en_word(PyUnicode_READ(kind, d, q - 2)))) return 1;
    }
    return 0;
}

static PyObject *english_sentences(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "english_sentences: text must be str"); return NULL; }
    int kind = PyUnicode_KIND(text);
    const void *d = PyUnicode_DATA(text);
    Py_ssize_t lo = 0, hi = PyUnicode_GET_LENGTH(text);
    while (lo < hi && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, d, lo))) lo++;  /* text.strip() */
    while (hi > lo && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, d, hi - 1))) hi--;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Py_ssize_t start = lo, i = lo, longest = 0;  /* (add_piece's longest piece: not needed here) */
    while (i < hi) {
        Py_UCS4 c = PyUnicode_READ(kind, d, i);
        if (c != '.' && c != '!' && c != '?') { i++; continue; }
        Py_ssize_t j = i;
        while (j < hi && ((c = PyUnicode_READ(kind, d, j)) == '.' || c == '!' || c == '?')) j++;
        while (j < hi && en_closer(PyUnicode_READ(kind, d, j))) j++;
        Py_ssize_t space = j;  /* group 1: the white space */
        while (j < hi && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, d, j))) j++;
        Py_ssize_t after = j, k = j;
        while (k < hi && en_opener(PyUnicode_READ(kind, d, k))) k++;
        if (after == space || k >= hi || !((c = PyUnicode_READ(kind, d, k)) >= 'A' && c <= 'Z') && !(c >= '0' && c <= '9')) {
            i = space > i ? space : i + 1;  /* no match from any position of this run of ends */
            continue;
        }
        Py_ssize_t tail = space - start > 12 ? space - 12 : start;
        if (!en_no_break(kind, d, tail, space)) {
            if (add_piece(out, text, kind, d, start, space, &longest) < 0) { Py_DECREF(out); return NULL; }
            start = after;
        }
        i = after;  /* finditer goes on after the match */
    }
    if (add_piece(out, text, kind, d, start, hi, &longest) < 0) { Py_DECREF(out); return NULL; }
    return out;
}

static PyMethodDef module_methods[] = {
    {"sum_tables", sum_tables, METH_VARARGS,
     "sum_tables(keys, values) -> (keys, values bytes): packed count tables summed key by key, first-seen order"},
    {"clean_spaces", clean_spaces, METH_VARARGS,
     "clean_spaces(text, wordlike) -> text with its whitespace cleaned up as data_prep/normalize.py does"},
    {"normalize_fast", normalize_fast, METH_VARARGS,
     "normalize_fast(documents, kinds, map_starts, map_data, wordlike) -> (normalised texts, documents left to the general path)"},
    {"split_sentences", split_sentences, METH_VARARGS,
     "split_sentences(documents, limit) -> (sentences of each document, documents with a sentence over limit)"},
    {"english_sentences", english_sentences, METH_O, "english_sentences(text) -> data_prep.english.split_sentences(text)"},
    {"english_words", (PyCFunction)(void (*)(void))english_words, METH_VARARGS | METH_KEYWORDS,
     "english_words(text, join=False) -> data_prep.english's words of text (_WORD_RE.findall), or (\" \".join(words), len(words))"},
    {"gather_words", gather_words, METH_VARARGS,
     "gather_words(heads, data, slots, ids, sentence_words, fine, coarse, align, fine_lengths, coarse_lengths): a shard's tokens from the memo's word blocks, in one pass"},
    {"join_items", join_items, METH_VARARGS, "join_items(items, indices, sep) -> sep.join(items[i] for i in indices)"},
    {"gather_ranges", gather_ranges, METH_VARARGS,
     "gather_ranges(values, starts, counts, tokens, out) -> values written: values[starts[t]:starts[t] + counts[t]] for t in tokens, concatenated"},
    {NULL, NULL, 0, NULL}};

static PyMethodDef wn_methods[] = {
    {"number", (PyCFunction)wn_number, METH_VARARGS, "number(words, out) -> how many words were new"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject WordNumbersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "data_prep._native.WordNumbers",
    .tp_basicsize = sizeof(WordNumbers),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WordNumbers(index: dict) -> numbers words through index (see the module comment)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)wn_init,
    .tp_dealloc = (destructor)wn_dealloc,
    .tp_methods = wn_methods,
};

/* ---- the Chinese encoding's coarse-vocabulary lookups (data_prep/chinese.py, encode_words) ----------
   TokenIndex(tokens) indexes a vocabulary's tokens (a list of str; a token's id is its position) by their
   code points, so that the encoding of a worker's new words looks them up without a str per lookup:
   - lookup(cps, lens, out, missing): out[w] = the id of word w, ``missing`` if it is no token; the words'
     code points are concatenated in cps (uint32), word w's length is lens[w] (int64);
   - backoff(cps, lens, max_chars, unk, ids, align, counts) -> tokens written: ChineseLanguage's
     _backoff_plain for every word (a word of one fine token per character outside the vocabulary):
     from each position the longest token of 2..max_chars characters, else the single character (its
     id, or ``unk``); the ids and the characters each covers go to ids / align (int64), each word's
     token count to counts[w].
   - number_joined(text, sep, out) -> (words, first new id, new code points, new lengths): the id of
     each word of text.split(sep), the words not indexed yet appended (the table grows): the
     encoding's per-worker word memo (chinese._EncodedWords), whose new words need no str, dict entry
     or Python int (real text: 1.84M words of which 714k new in a 33 MB build, ~0.9 s through
     StringNumbering against ~0.25 s here; 61 bytes a word kept against 170).
   Why: on real text most of a worker's new words are outside the coarse vocabulary (a corpus of
   classical poetry: ~180k distinct back-offs in a 33 MB build, 2.3 s of Python against ~0.1 s here).
   tests/test_native.py holds them equal to the dict-based Python on random words. */

typedef struct {
    PyObject_HEAD
    Py_UCS4 *cps;      /* the tokens' code points, concatenated */
    int64_t *start;    /* token k: cps[start[k] : start[k + 1]] */
    int64_t *slot;     /* open addressing: token id + 1; 0 = empty */
    uint64_t *hash;    /* the hash of the slot's token */
    size_t mask;
    Py_ssize_t n;
    size_t cps_cap, start_cap;  /* room in cps and start (number_joined appends tokens) */
} TokenIndex;


static uint64_t ti_hash(const Py_UCS4 *s, Py_ssize_t n) {
    uint64_t h = TI_SEED;
    for (Py_ssize_t i = 0; i < n; i++) h = ti_step(h, s[i]);
    return ti_final(h, n);
}

/* The id of the token s[0:n] (its hash h), -1 if none. */
static inline Py_ssize_t ti_find(const TokenIndex *t, uint64_t h, const Py_UCS4 *s, Py_ssize_t n) {
    for (size_t j = h & t->mask;; j = (j + 1) & t->mask) {
        int64_t k = t->slot[j];
        if (!k) return -1;
        if (t->hash[j] != h) continue;
        k--;
        if (t->start[k + 1] - t->start[k] == n && !memcmp(t->cps + t->start[k], s, (size_t)n * sizeof(Py_UCS4))) return k;
    }
}

static void ti_free(TokenIndex *t) {
    free(t->cps); free(t->start); free(t->slot); free(t->hash);
    t->cps = NULL; t->start = NULL; t->slot = NULL; t->hash = NULL; t->n = 0; t->mask = 0;
    t->cps_cap = t->start_cap = 0;
}

static int ti_init(TokenIndex *t, PyObject *args, PyObject *kwds) {
    PyObject *tokens;
    if (!PyArg_ParseTuple(args, "O", &tokens)) return -1;
    PyObject *seq = PySequence_Fast(tokens, "tokens must be a sequence of str");
    if (!seq) return -1;
    ti_free(t);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (!PyUnicode_Check(items[k])) { PyErr_SetString(PyExc_TypeError, "tokens must be str"); Py_DECREF(seq); return -1; }
        total += PyUnicode_GET_LENGTH(items[k]);
    }
    size_t cap = 16;
    while (cap < (size_t)n * 2 + 2) cap *= 2;
    t->cps = malloc(((size_t)total + 1) * sizeof(Py_UCS4));
    t->start = malloc(((size_t)n + 1) * sizeof(int64_t));
    t->slot = calloc(cap, sizeof(int64_t));
    t->hash = malloc(cap * sizeof(uint64_t));
    if (!t->cps || !t->start || !t->slot || !t->hash) { ti_free(t); Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    t->mask = cap - 1;
    t->cps_cap = (size_t)total + 1; t->start_cap = (size_t)n + 1;
    int64_t pos = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(items[k]);
        if (!PyUnicode_AsUCS4(items[k], t->cps + pos, total - pos + 1, 0)) {
            ti_free(t); Py_DECREF(seq); return -1;
        }
        t->start[k] = pos;
        uint64_t h = ti_hash(t->cps + pos, len);
        t->start[k + 1] = pos + len;  /* (ti_find reads start[k + 1] of the token it compares) */
        if (ti_find(t, h, t->cps + pos, len) < 0) {  /* a repeated token keeps its first id */
            size_t j = h & t->mask;
            while (t->slot[j]) j = (j + 1) & t->mask;
            t->slot[j] = k + 1; t->hash[j] = h;
        }
        pos += len;
    }
    t->start[n] = pos;
    t->n = n;
    Py_DECREF(seq);
    return 0;
}

static void ti_dealloc(TokenIndex *t) {
    ti_free(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* cps as a contiguous buffer of 4-byte code points (uint32). */
static int get_code_points(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->itemsize != 4 || f[1] != 0 || !strchr("IL", *f)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "cps must be a contiguous array of uint32 code points");
        return -1;
    }
    return 0;
}

/* The words' bounds checked against cps: 0, or -1 with an error. */
static int ti_check_words(const int64_t *lens, Py_ssize_t words, Py_ssize_t ncps) {
    Py_ssize_t total = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        if (lens[w] < 0 || lens[w] > ncps - total) {
            PyErr_Format(PyExc_ValueError, "word %zd (length %lld) runs past the %zd code points given", w, (long long)lens[w], ncps);
            return -1;
        }
        total += lens[w];
    }
    return 0;
}

static PyObject *ti_lookup(TokenIndex *t, PyObject *args) {
    PyObject *ocps, *olens, *oout;
    long long missing;
    if (!PyArg_ParseTuple(args, "OOOL", &ocps, &olens, &oout, &missing)) return NULL;
    if (!t->slot) { PyErr_SetString(PyExc_RuntimeError, "TokenIndex was not initialised"); return NULL; }
    Py_buffer c, l, o;
    if (get_code_points(ocps, &c) < 0) return NULL;
    if (get_ints(olens, &l, 0, "lens", 8) < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_ints(oout, &o, 1, "out", 8) < 0) { PyBuffer_Release(&c); PyBuffer_Release(&l); return NULL; }
    PyObject *result = NULL;
    Py_ssize_t words = l.len / 8;
    const int64_t *lens = (const int64_t *)l.buf;
    int64_t *out = (int64_t *)o.buf;
    const Py_UCS4 *s = (const Py_UCS4 *)c.buf;
    if (o.len / 8 < words) { PyErr_SetString(PyExc_ValueError, "out must have room for every word"); goto done; }
    if (ti_check_words(lens, words, c.len / 4) < 0) goto done;
    Py_ssize_t a = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        Py_ssize_t id = ti_find(t, ti_hash(s + a, lens[w]), s + a, lens[w]);
        out[w] = id < 0 ? missing : id;
        a += lens[w];
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&c); PyBuffer_Release(&l); PyBuffer_Release(&o);
    return result;
}

static PyObject *ti_backoff(TokenIndex *t, PyObject *args) {
    PyObject *ocps, *olens, *oids, *oalign, *ocounts;
    Py_ssize_t max_chars;
    long long unk;
    if (!PyArg_ParseTuple(args, "OOnLOOO", &ocps, &olens, &max_chars, &unk, &oids, &oalign, &ocounts)) return NULL;
    if (!t->slot) { PyErr_SetString(PyExc_RuntimeError, "TokenIndex was not initialised"); return NULL; }
    if (max_chars < 1) { PyErr_SetString(PyExc_ValueError, "max_chars must be at least 1"); return NULL; }
    Py_buffer c, l, bi, ba, bc;
    if (get_code_points(ocps, &c) < 0) return NULL;
    if (get_ints(olens, &l, 0, "lens", 8) < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_ints(oids, &bi, 1, "ids", 8) < 0) { PyBuffer_Release(&c); PyBuffer_Release(&l); return NULL; }
    if (get_ints(oalign, &ba, 1, "align", 8) < 0) { PyBuffer_Release(&c); PyBuffer_Release(&l); PyBuffer_Release(&bi); return NULL; }
    if (get_ints(ocounts, &bc, 1, "counts", 8) < 0) {
        PyBuffer_Release(&c); PyBuffer_Release(&l); PyBuffer_Release(&bi); PyBuffer_Release(&ba); return NULL;
    }
    PyObject *result = NULL;
    uint64_t *prefix = NULL;
    Py_ssize_t words = l.len / 8, ncps = c.len / 4, room = bi.len / 8 < ba.len / 8 ? bi.len / 8 : ba.len / 8, pos = 0;
    const int64_t *lens = (const int64_t *)l.buf;
    const Py_UCS4 *s = (const Py_UCS4 *)c.buf;
    int64_t *ids = (int64_t *)bi.buf, *align = (int64_t *)ba.buf, *counts = (int64_t *)bc.buf;
    if (bc.len / 8 < words) { PyErr_SetString(PyExc_ValueError, "counts must have room for every word"); goto done; }
    if (room < ncps) { PyErr_SetString(PyExc_ValueError, "ids and align must have room for every code point"); goto done; }
    if (ti_check_words(lens, words, ncps) < 0) goto done;
    if (!(prefix = malloc(((size_t)max_chars + 1) * sizeof(uint64_t)))) { PyErr_NoMemory(); goto done; }
    Py_ssize_t a = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        const Py_UCS4 *word = s + a;
        Py_ssize_t n = lens[w], i = 0, before = pos;
        while (i < n) {
            Py_ssize_t longest = n - i < max_chars ? n - i : max_chars, k;
            uint64_t h = TI_SEED;
            for (k = 1; k <= longest; k++) prefix[k] = h = ti_step(h, word[i + k - 1]);
            Py_ssize_t id = -1;
            for (k = longest; k >= 2; k--)
                if ((id = ti_find(t, ti_final(prefix[k], k), word + i, k)) >= 0) break;
            if (id < 0) {
                k = 1;
                id = ti_find(t, ti_final(prefix[1], 1), word + i, 1);
                if (id < 0) id = unk;
            }
            ids[pos] = id; align[pos] = k; pos++;
            i += k;
        }
        counts[w] = pos - before;
        a += n;
    }
    result = PyLong_FromSsize_t(pos);
done:
    free(prefix);
    PyBuffer_Release(&c); PyBuffer_Release(&l); PyBuffer_Release(&bi); PyBuffer_Release(&ba); PyBuffer_Release(&bc);
    return result;
}

/* Room for one more token of ``len`` code points: cps, start and the hash table (kept at most half
   full) grown by doubling. 0, or -1 with MemoryError. */
static int ti_reserve(TokenIndex *t, Py_ssize_t len) {
    size_t need = (size_t)t->start[t->n] + (size_t)len + 1;
    if (need > t->cps_cap) {
        size_t cap = t->cps_cap * 2;
        while (cap < need) cap *= 2;
        Py_UCS4 *cps = realloc(t->cps, cap * sizeof(Py_UCS4));
        if (!cps) { PyErr_NoMemory(); return -1; }
        t->cps = cps; t->cps_cap = cap;
    }
    if ((size_t)t->n + 2 > t->start_cap) {
        int64_t *start = realloc(t->start, t->start_cap * 2 * sizeof(int64_t));
        if (!start) { PyErr_NoMemory(); return -1; }
        t->start = start; t->start_cap *= 2;
    }
    if (((size_t)t->n + 1) * 2 > t->mask + 1) {
        size_t cap = (t->mask + 1) * 2;
        int64_t *slot = calloc(cap, sizeof(int64_t));
        uint64_t *hash = malloc(cap * sizeof(uint64_t));
        if (!slot || !hash) { free(slot); free(hash); PyErr_NoMemory(); return -1; }
        for (size_t j = 0; j <= t->mask; j++) {
            if (!t->slot[j]) continue;
            size_t i = t->hash[j] & (cap - 1);
            while (slot[i]) i = (i + 1) & (cap - 1);
            slot[i] = t->slot[j]; hash[i] = t->hash[j];
        }
        free(t->slot); free(t->hash);
        t->slot = slot; t->hash = hash; t->mask = cap - 1;
    }
    return 0;
}

/* number_joined(text, sep, out) -> (words, first new id, new code points, new lengths): the id of each
   word of text.split(sep) in out (int64), the words not indexed yet added in order of first
   appearance (ids first, first + 1, ...); their code points (bytes: uint32, concatenated) and
   lengths (bytes: int64). The Chinese encoding's per-worker word memo (``_EncodedWords``): a shard's
   distinct words arrive joined, and a new word needs no str (its encoding reads code points). */
static PyObject *ti_number_joined(TokenIndex *t, PyObject *args) {
    PyObject *text, *sep, *out;
    if (!PyArg_ParseTuple(args, "UUO", &text, &sep, &out)) return NULL;
    if (!t->slot) { PyErr_SetString(PyExc_RuntimeError, "TokenIndex was not initialised"); return NULL; }
    if (PyUnicode_GET_LENGTH(sep) != 1) { PyErr_SetString(PyExc_ValueError, "sep must be one character"); return NULL; }
    Py_UCS4 cut = PyUnicode_READ_CHAR(sep, 0);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), words = 1;
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(text);
    if (!s) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) words += s[i] == cut;
    Py_buffer o;
    if (get_ints(out, &o, 1, "out", 8) < 0) { PyMem_Free(s); return NULL; }
    PyObject *result = NULL, *cps = NULL, *lens = NULL;
    if (o.len / 8 < words) { PyErr_SetString(PyExc_ValueError, "out must have room for every word"); goto done; }
    int64_t *ids = (int64_t *)o.buf;
    Py_ssize_t first = t->n, a = 0, w = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n && s[i] != cut) continue;
        Py_ssize_t len = i - a;
        uint64_t h = ti_hash(s + a, len);
        Py_ssize_t id = ti_find(t, h, s + a, len);
        if (id < 0) {
            if (ti_reserve(t, len) < 0) goto done;
            id = t->n;
            int64_t at = t->start[id];
            memcpy(t->cps + at, s + a, (size_t)len * sizeof(Py_UCS4));
            t->start[id + 1] = at + len;
            size_t j = h & t->mask;
            while (t->slot[j]) j = (j + 1) & t->mask;
            t->slot[j] = id + 1; t->hash[j] = h;
            t->n++;
        }
        ids[w++] = id;
        a = i + 1;
    }
    int64_t c0 = t->start[first];
    cps = PyBytes_FromStringAndSize((const char *)(t->cps + c0), (Py_ssize_t)((t->start[t->n] - c0) * sizeof(Py_UCS4)));
    lens = PyBytes_FromStringAndSize(NULL, (t->n - first) * (Py_ssize_t)sizeof(int64_t));
    if (!cps || !lens) goto done;
    int64_t *l = (int64_t *)PyBytes_AS_STRING(lens);
    for (Py_ssize_t k = first; k < t->n; k++) l[k - first] = t->start[k + 1] - t->start[k];
    result = Py_BuildValue("nnOO", words, first, cps, lens);
done:
    PyMem_Free(s); Py_XDECREF(cps); Py_XDECREF(lens); PyBuffer_Release(&o);
    return result;
}

static PyObject *ti_len(TokenIndex *t, void *closure) { return PyLong_FromSsize_t(t->n); }

static PyMethodDef ti_methods[] = {
    {"lookup", (PyCFunction)ti_lookup, METH_VARARGS, "lookup(cps, lens, out, missing): each word's token id (missing if none)"},
    {"backoff", (PyCFunction)ti_backoff, METH_VARARGS,
     "backoff(cps, lens, max_chars, unk, ids, align, counts) -> tokens written: the forward longest match of each word"},
    {"number_joined", (PyCFunction)ti_number_joined, METH_VARARGS,
     "number_joined(text, sep, out) -> (words, first new id, new code points, new lengths): ids of text.split(sep), new words added"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef ti_getset[] = {{"size", (getter)ti_len, NULL, "how many tokens", NULL}, {NULL}};

static PyTypeObject TokenIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "data_prep._native.TokenIndex",
    .tp_basicsize = sizeof(TokenIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TokenIndex(tokens: list[str]) -> a vocabulary's tokens indexed by their code points (see above)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ti_init,
    .tp_dealloc = (destructor)ti_dealloc,
    .tp_methods = ti_methods,
    .tp_getset = ti_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "data_prep._native", "The Chinese build's word numbering and sentence splitting in C.", -1, module_methods};
PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&WordNumbersType) < 0 || PyType_Ready(&JiebaType) < 0 || PyType_Ready(&TokenIndexType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "WordNumbers", (PyObject *)&WordNumbersType) < 0) { Py_DECREF(m); return NULL; }
    if (PyModule_AddObjectRef(m, "Jieba", (PyObject *)&JiebaType) < 0) { Py_DECREF(m); return NULL; }
    if (PyModule_AddObjectRef(m, "TokenIndex", (PyObject *)&TokenIndexType) < 0) { Py_DECREF(m); return NULL; }
    /* data_prep/languages.py (NATIVE_VERSION) uses a compiled module only if this matches: a module
       compiled from an older _native.c (a checkout updated without re-running the set-up) is skipped. */
    if (PyModule_AddIntConstant(m, "VERSION", 14) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
