#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* data_prep._native: the word numbering of the Chinese build's analysis (data_prep/chinese.py, WordIds)
   and its sentence splitting (split_sentences below; data_prep/normalize.py, split_sentences_batch),
   compiled by `pip install -e .` (setup.py; launchers/setup.sh runs it). Optional: without it the same
   numbering runs through the dict in Python and the split through regular expressions (same results;
   tests/test_native.py holds both paths equal).

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

static inline uint64_t mix(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL; k ^= k >> 33;
    return k;
}

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
                     widths == 8 ? "8" : "4- or 8");
        return -1;
    }
    return 0;
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

static PyMethodDef module_methods[] = {
    {"split_sentences", split_sentences, METH_VARARGS,
     "split_sentences(documents, limit) -> (sentences of each document, documents with a sentence over limit)"},
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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "data_prep._native", "The Chinese build's word numbering and sentence splitting in C.", -1, module_methods};
PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&WordNumbersType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "WordNumbers", (PyObject *)&WordNumbersType) < 0) { Py_DECREF(m); return NULL; }
    /* data_prep/languages.py (NATIVE_VERSION) uses a compiled module only if this matches: a module
       compiled from an older _native.c (a checkout updated without re-running the set-up) is skipped. */
    if (PyModule_AddIntConstant(m, "VERSION", 3) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
