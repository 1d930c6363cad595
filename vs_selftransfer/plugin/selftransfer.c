/*
 * selftransfer: VapourSynth (API 4) plugin that upscales a clip with a per-video CARN-M bundle (.stm).
 *
 *   core.selftransfer.Upscale(clip, model[, backend, device, tilesize, overlap, num_streams, precision, threads,
 *                             scale, reuse])
 *   core.selftransfer.Version()
 *
 * The network runs in Python (vs_selftransfer.runtime: ONNX Runtime, OpenVINO, PyTorch or TensorRT). This file is
 * the bridge: it validates the clip, converts it to 32-bit float planar RGB with the core's resizer, lends each
 * frame's planes to the runtime under the GIL as memoryviews of the frame memory (numpy reads and writes them in
 * place: no copy in the bridge), clamps the result to [0, 1] and converts it back to the clip's own format. The
 * graph Upscale returns is
 *
 *     clip -> std.RemoveFrameProps(colorimetry) -> resize to RGBS -> [Upscale: the model, clamped] -> resize back
 *          [-> std.Limiter for float YUV] -> std.CopyFrameProps(clip)
 *
 * (for an RGBS clip, just the middle node). The colorimetry of the whole clip is read from frame 0 at script
 * evaluation and used for both conversions, so a frame is decoded and re-encoded with the same matrix/range/chroma
 * location; an untagged YUV clip's matrix comes from vs_selftransfer.colour, the rule the trainer decodes with. The
 * output frames carry the source frames' own properties.
 *
 * Frames run in parallel (fmParallel), but at most num_streams at a time: each running frame holds one slot of a
 * pool, and a slot is one backend session in the runtime. Backends release the GIL while they compute, so the
 * slots overlap.
 */

/* Python.h first: it sets the feature-test macros (_GNU_SOURCE, which dladdr needs). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* API 4.2: the _Range frame property with H.273 numbering (1 = full, 0 = limited), VapourSynth R74 and later. */
#define VS_USE_API_42

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "VapourSynth4.h"
#include "VSHelper4.h"
#include "VSConstants4.h"

#if !defined(SELFTRANSFER_VERSION) || !defined(SELFTRANSFER_VERSION_MAJOR) || !defined(SELFTRANSFER_VERSION_MINOR)
#error "the SELFTRANSFER_VERSION* macros come from setup.py: build with python setup.py build_ext --inplace"
#endif

#define PLUGIN_ID "com.selftransfer.upscale"
#define FUNC "selftransfer.Upscale"
#define RUNTIME_MODULE "vs_selftransfer.runtime"
#define COLOUR_MODULE "vs_selftransfer.colour"
#define ERR_SIZE 2048

/* ------------------------------------------------------------------------------------------------------------ */
/* small helpers                                                                                                  */

/* printf into a new heap string (the caller frees it). */
static char *format_message(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (len < 0)
        len = 0;
    char *buf = malloc((size_t)len + 1);
    if (!buf)
        abort(); /* out of memory while reporting an error: nothing sensible left to do */
    va_start(ap, fmt);
    vsnprintf(buf, (size_t)len + 1, fmt, ap);
    va_end(ap);
    return buf;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Python                                                                                                         */

static int python_is_finalizing(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* Whether this thread may take the GIL. A thread that tries to during interpreter shutdown would hang forever. */
static int python_usable(void) {
    return Py_IsInitialized() && !python_is_finalizing();
}

/* A Python str as UTF-8 that any message can carry (a new bytes object; NULL with an exception set): characters
 * UTF-8 cannot encode are shown escaped, as Python's repr would. A file name's undecodable bytes (os.fsdecode's
 * surrogate escapes) become \xNN, any other lone surrogate \udNNN. */
static PyObject *printable_utf8(PyObject *text) {
    PyObject *raw = PyUnicode_AsEncodedString(text, "utf-8", "surrogateescape");
    if (!raw) {
        PyErr_Clear();
        return PyUnicode_AsEncodedString(text, "utf-8", "backslashreplace");
    }
    PyObject *escaped = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "backslashreplace");
    Py_DECREF(raw);
    PyObject *out = escaped ? PyUnicode_AsUTF8String(escaped) : NULL;
    Py_XDECREF(escaped);
    return out;
}

/* Take the pending Python exception (the GIL is held) and turn it into "selftransfer.Upscale: [Type: ]message".
 * The exception is cleared. */
static char *take_python_error(int with_type) {
    PyObject *exc = PyErr_GetRaisedException();
    if (!exc)
        return format_message("%s: the Python runtime failed without an exception", FUNC);
    const char *type = Py_TYPE(exc)->tp_name;
    const char *dot = strrchr(type, '.');
    if (dot)
        type = dot + 1;
    PyObject *str = PyObject_Str(exc);
    PyObject *text = str ? printable_utf8(str) : NULL;
    Py_XDECREF(str);
    const char *msg = text ? PyBytes_AS_STRING(text) : NULL;
    if (!msg) {
        PyErr_Clear();
        msg = "";
    }
    char *out;
    if (with_type)
        out = format_message("%s: %s%s%s", FUNC, type, *msg ? ": " : "", msg);
    else
        out = format_message("%s: %s", FUNC, *msg ? msg : type);
    Py_XDECREF(text);
    Py_DECREF(exc);
    return out;
}

static int copy_error(char *err, size_t size, char *message) {
    snprintf(err, size, "%s", message);
    free(message);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* frame planes lent to Python                                                                                    */

/* Each frame plane reaches the runtime as a plain memoryview (2-D float32, h x w, rows `stride` bytes apart) over
 * VapourSynth's frame memory, made with PyMemoryView_FromBuffer: numpy reads and writes it in place.
 *
 * Why nothing of this library can be called after VapourSynth unloads it, whatever the runtime keeps: VapourSynth
 * unloads plugins when its core is freed, and Python may free what the runtime kept (an array, a traceback cycle)
 * later still, during its own shutdown. So no Python object may lead back into this library:
 *   - the view is a memoryview with no exporting object (its buffer's obj is NULL), so every view and array derived
 *     from it is served and released by Python's own code, which never calls back into an exporter here;
 *   - every pointer the view's Py_buffer holds (format, shape, strides) points to a PlaneLayout on the heap that is
 *     never freed (one per distinct plane geometry, a handful per process), not to this library's static data or to
 *     memory freed with a frame;
 *   - the plugin defines no Python type and passes Python no function of its own.
 * After the call each view is released (memoryview.release(): any later use raises ValueError) and the plugin
 * checks that nothing else can reach the memory: every view or array derived from a memoryview holds a reference
 * to the managed buffer the memoryview references (the only object a memoryview's tp_traverse visits), and a
 * consumer holding the view's own buffer makes release() fail. If something still can (the runtime kept an array;
 * a reference cycle the garbage collector cannot break), the frame fails with an error and its memory is leaked on
 * purpose: freeing it would leave Python an array into freed memory. Leaking is the only safe choice, and it costs
 * a frame per runtime bug, never a crash. */

typedef struct PlaneLayout {
    Py_ssize_t shape[2];
    Py_ssize_t strides[2];
    struct PlaneLayout *next;
} PlaneLayout;

static PlaneLayout *plane_layouts; /* every layout handed out so far; the GIL guards the list */
static char *float_format;         /* "f", on the heap for the same reason as the layouts */

/* The layout of an h x w float32 plane with rows `stride` bytes apart: found or added, never freed. */
static const PlaneLayout *plane_layout(int width, int height, ptrdiff_t stride) {
    for (PlaneLayout *l = plane_layouts; l; l = l->next)
        if (l->shape[0] == height && l->shape[1] == width && l->strides[0] == (Py_ssize_t)stride)
            return l;
    if (!float_format && (float_format = malloc(2)))
        memcpy(float_format, "f", 2);
    PlaneLayout *layout = malloc(sizeof *layout);
    if (!layout || !float_format) {
        free(layout);
        return NULL;
    }
    layout->shape[0] = height;
    layout->shape[1] = width;
    layout->strides[0] = (Py_ssize_t)stride;
    layout->strides[1] = sizeof(float);
    layout->next = plane_layouts;
    plane_layouts = layout;
    return layout;
}

#define MAX_REFERENTS 4

/* One plane while it is lent: the memoryview, and what it references, held by the plugin until the check. */
typedef struct {
    PyObject *view;
    PyObject *referents[MAX_REFERENTS];
    int num_referents;
    int too_many_referents; /* more than MAX_REFERENTS: cannot be checked, taken as still reachable */
} LentPlane;

/* Returns 0 or -1 with a Python exception set. */
static int lend_plane(LentPlane *plane, uint8_t *data, int width, int height, ptrdiff_t stride, int writable) {
    const PlaneLayout *layout = plane_layout(width, height, stride);
    if (!layout) {
        PyErr_NoMemory();
        return -1;
    }
    Py_buffer buffer = {
        .buf = data,
        .obj = NULL,
        .len = (Py_ssize_t)width * height * (Py_ssize_t)sizeof(float),
        .itemsize = sizeof(float),
        .readonly = !writable,
        .ndim = 2,
        .format = float_format,
        .shape = (Py_ssize_t *)layout->shape,
        .strides = (Py_ssize_t *)layout->strides,
        .suboffsets = NULL,
        .internal = NULL,
    };
    plane->view = PyMemoryView_FromBuffer(&buffer);
    return plane->view ? 0 : -1;
}

static int collect_referent(PyObject *object, void *arg) {
    LentPlane *plane = (LentPlane *)arg;
    if (plane->num_referents == MAX_REFERENTS) {
        plane->too_many_referents = 1;
        return 1; /* stop */
    }
    plane->referents[plane->num_referents++] = Py_NewRef(object);
    return 0;
}

typedef struct {
    PyObject *object;
    Py_ssize_t visits;
} VisitCount;

static int count_visits(PyObject *object, void *arg) {
    VisitCount *count = (VisitCount *)arg;
    count->visits += object == count->object;
    return 0;
}

/* Hold what the view references, before the check (the view is alive and unreleased here). */
static void hold_referents(LentPlane *plane) {
    plane->num_referents = 0;
    plane->too_many_referents = 0;
    traverseproc traverse = Py_TYPE(plane->view)->tp_traverse;
    if (traverse)
        traverse(plane->view, collect_referent, plane);
    else
        plane->too_many_referents = 1;
}

/* Whether anything but the plugin (the held references and the view itself) references the view's referents:
 * then some derived view or array can still reach the frame memory. */
static int referenced_elsewhere(LentPlane *plane) {
    if (plane->too_many_referents)
        return 1;
    traverseproc traverse = Py_TYPE(plane->view)->tp_traverse;
    for (int i = 0; i < plane->num_referents; i++) {
        VisitCount count = {plane->referents[i], 0};
        if (traverse)
            traverse(plane->view, count_visits, &count);
        if (Py_REFCNT(plane->referents[i]) > 1 + count.visits)
            return 1;
    }
    return 0;
}

/* Release the view: no new access through it, and fails while a consumer holds its buffer. */
static int release_view(LentPlane *plane) {
    PyObject *result = PyObject_CallMethod(plane->view, "release", NULL);
    if (!result) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(result);
    return 1;
}

/* gc.collect(), which runs even where automatic collection is disabled (PyGC_Collect does not). */
static void collect_garbage(void) {
    PyObject *gc = PyImport_ImportModule("gc");
    PyObject *result = gc ? PyObject_CallMethod(gc, "collect", NULL) : NULL;
    Py_XDECREF(result);
    Py_XDECREF(gc);
    PyErr_Clear();
}

/* Take back the lent planes after the call (the GIL is held): release every view, collect garbage once if
 * something still references one (a traceback cycle), and set reachable[i] for each plane whose memory Python can
 * still reach. Drops the plugin's references either way. Does not disturb a pending Python exception. */
static void take_back_planes(LentPlane *planes, int count, int *reachable) {
    PyObject *pending = PyErr_GetRaisedException();
    int any = 0;
    for (int i = 0; i < count; i++) {
        reachable[i] = 0;
        if (!planes[i].view)
            continue;
        hold_referents(&planes[i]);
        reachable[i] = !release_view(&planes[i]) || referenced_elsewhere(&planes[i]);
        any |= reachable[i];
    }
    if (any) {
        collect_garbage();
        for (int i = 0; i < count; i++)
            if (reachable[i])
                reachable[i] = !release_view(&planes[i]) || referenced_elsewhere(&planes[i]);
    }
    for (int i = 0; i < count; i++) {
        for (int r = 0; r < planes[i].num_referents; r++)
            Py_DECREF(planes[i].referents[r]);
        planes[i].num_referents = 0;
        Py_CLEAR(planes[i].view);
    }
    PyErr_SetRaisedException(pending);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* slot pool: at most num_streams frames inside the runtime at once, each with its own session                   */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t released;
    int *free_slots; /* stack of the slot indices not in use */
    int num_free;
    int num_slots;
} SlotPool;

static int pool_init(SlotPool *pool, int num_slots) {
    pool->free_slots = malloc(sizeof(int) * (size_t)num_slots);
    if (!pool->free_slots)
        return 0;
    for (int i = 0; i < num_slots; i++)
        pool->free_slots[i] = num_slots - 1 - i; /* slot 0 on top: a single-frame request always uses session 0 */
    pool->num_free = num_slots;
    pool->num_slots = num_slots;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->released, NULL);
    return 1;
}

static int pool_acquire(SlotPool *pool) {
    pthread_mutex_lock(&pool->lock);
    while (pool->num_free == 0)
        pthread_cond_wait(&pool->released, &pool->lock);
    int slot = pool->free_slots[--pool->num_free];
    pthread_mutex_unlock(&pool->lock);
    return slot;
}

static void pool_release(SlotPool *pool, int slot) {
    pthread_mutex_lock(&pool->lock);
    pool->free_slots[pool->num_free++] = slot;
    pthread_cond_signal(&pool->released);
    pthread_mutex_unlock(&pool->lock);
}

static void pool_destroy(SlotPool *pool) {
    if (!pool->free_slots)
        return;
    pthread_cond_destroy(&pool->released);
    pthread_mutex_destroy(&pool->lock);
    free(pool->free_slots);
    pool->free_slots = NULL;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* the RGBS filter                                                                                                */

typedef struct {
    VSNode *node;      /* RGBS input */
    VSVideoInfo vi;    /* RGBS output, scale x the input size */
    PyObject *session; /* vs_selftransfer.runtime.Upscaler */
    PyObject *process; /* session.process(slot, n, src_planes, dst_planes) */
    SlotPool pool;
} UpscaleData;

/* Drop the instance's Python references. Skipped (leaked) when the interpreter is gone or going: taking the GIL
 * then would hang, and the process is exiting anyway. */
static void release_python_objects(PyObject **objects, int count) {
    int any = 0;
    for (int i = 0; i < count; i++)
        any |= objects[i] != NULL;
    if (!any || !python_usable())
        return;
    PyGILState_STATE gil = PyGILState_Ensure();
    for (int i = 0; i < count; i++)
        Py_CLEAR(objects[i]);
    PyGILState_Release(gil);
}

static void VS_CC upscale_free(void *instance_data, VSCore *core, const VSAPI *vsapi) {
    UpscaleData *d = (UpscaleData *)instance_data;
    PyObject *objects[2] = {d->process, d->session};
    release_python_objects(objects, 2);
    vsapi->freeNode(d->node);
    pool_destroy(&d->pool);
    free(d);
}

/* Runs the model on one frame; the GIL is held. Returns NULL or an error message to free. Sets *keep_src /
 * *keep_dst when Python can still reach that frame's memory (see take_back_planes): it must then stay allocated. */
static char *run_model(UpscaleData *d, int slot, int n, const VSFrame *src, VSFrame *dst, const VSAPI *vsapi,
                       int *keep_src, int *keep_dst) {
    LentPlane planes[6];
    PyObject *src_planes = NULL, *dst_planes = NULL, *result = NULL;
    char *error = NULL;

    memset(planes, 0, sizeof planes);
    for (int p = 0; p < 3; p++) {
        if (lend_plane(&planes[p], (uint8_t *)vsapi->getReadPtr(src, p), vsapi->getFrameWidth(src, p),
                       vsapi->getFrameHeight(src, p), vsapi->getStride(src, p), 0) < 0 ||
            lend_plane(&planes[3 + p], vsapi->getWritePtr(dst, p), vsapi->getFrameWidth(dst, p),
                       vsapi->getFrameHeight(dst, p), vsapi->getStride(dst, p), 1) < 0)
            goto python_error;
    }
    src_planes = PyTuple_Pack(3, planes[0].view, planes[1].view, planes[2].view);
    dst_planes = PyTuple_Pack(3, planes[3].view, planes[4].view, planes[5].view);
    if (!src_planes || !dst_planes)
        goto python_error;
    result = PyObject_CallFunction(d->process, "iiOO", slot, n, src_planes, dst_planes);
    if (!result)
        goto python_error;
    goto take_back;

python_error:
    error = take_python_error(1); /* drops the exception and its traceback, and with them the failed call's arrays */
take_back:
    Py_XDECREF(result);
    Py_XDECREF(src_planes);
    Py_XDECREF(dst_planes);
    int reachable[6];
    take_back_planes(planes, 6, reachable);
    *keep_src = reachable[0] | reachable[1] | reachable[2];
    *keep_dst = reachable[3] | reachable[4] | reachable[5];
    if (*keep_src || *keep_dst) {
        const char *kept = "the runtime kept a reference to frame memory after returning (a numpy array or view of "
                           "a frame plane is still alive); the frame's memory is leaked rather than freed under it";
        char *message = error ? format_message("%s; and %s", error, kept) : format_message("%s: %s", FUNC, kept);
        free(error);
        error = message;
    }
    return error;
}

/* Every output is clamped to the nominal RGB range [0, 1] (NaN -> 0), here rather than after the RGB -> YUV
 * conversion, which would carry overshoot into the chroma: integer formats cannot hold more, and float formats
 * get the same values as integer ones (a float YUV output is also limited to its nominal range after the
 * conversion, see from_rgbs). */
static void clamp_unit_range(VSFrame *frame, const VSAPI *vsapi) {
    for (int p = 0; p < 3; p++) {
        uint8_t *row = vsapi->getWritePtr(frame, p);
        ptrdiff_t stride = vsapi->getStride(frame, p);
        int width = vsapi->getFrameWidth(frame, p), height = vsapi->getFrameHeight(frame, p);
        for (int y = 0; y < height; y++, row += stride) {
            float *v = (float *)row;
            for (int x = 0; x < width; x++)
                v[x] = v[x] >= 0.0f ? (v[x] <= 1.0f ? v[x] : 1.0f) : 0.0f;
        }
    }
}

static const VSFrame *VS_CC upscale_get_frame(int n, int activation_reason, void *instance_data, void **frame_data,
                                              VSFrameContext *frame_ctx, VSCore *core, const VSAPI *vsapi) {
    UpscaleData *d = (UpscaleData *)instance_data;
    if (activation_reason == arInitial) {
        vsapi->requestFrameFilter(n, d->node, frame_ctx);
        return NULL;
    }
    if (activation_reason != arAllFramesReady)
        return NULL;

    const VSFrame *src = vsapi->getFrameFilter(n, d->node, frame_ctx);
    VSFrame *dst = vsapi->newVideoFrame(&d->vi.format, d->vi.width, d->vi.height, src, core);
    char *error = NULL;
    if (!python_usable()) {
        error = format_message("%s: the Python interpreter is not running (shutting down?); frame %d not produced",
                               FUNC, n);
    } else {
        int slot = pool_acquire(&d->pool); /* wait for a free session before taking the GIL */
        PyGILState_STATE gil = PyGILState_Ensure();
        int keep_src = 0, keep_dst = 0;
        error = run_model(d, slot, n, src, dst, vsapi, &keep_src, &keep_dst);
        PyGILState_Release(gil);
        pool_release(&d->pool, slot);
        /* Python can still reach these frames' memory: leak them rather than free memory it may touch later. */
        if (keep_src)
            src = NULL;
        if (keep_dst)
            dst = NULL;
    }
    if (src)
        vsapi->freeFrame(src);
    if (error) {
        vsapi->setFilterError(error, frame_ctx);
        free(error);
        if (dst)
            vsapi->freeFrame(dst);
        return NULL;
    }
    clamp_unit_range(dst, vsapi);
    return dst;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* arguments                                                                                                      */

typedef enum { ARG_DATA, ARG_INT, ARG_INT_ARRAY } ArgKind;

/* Every optional argument of Upscale, forwarded by name to vs_selftransfer.runtime.create(), which validates them
 * all. The registered argument string is built from this table, so nothing can be registered and then ignored. */
static const struct {
    const char *name;
    ArgKind kind;
} RUNTIME_ARGS[] = {
    {"backend", ARG_DATA},  {"device", ARG_DATA},      {"tilesize", ARG_INT_ARRAY},
    {"overlap", ARG_INT},   {"num_streams", ARG_INT},  {"precision", ARG_DATA},
    {"threads", ARG_INT},   {"scale", ARG_INT},        {"reuse", ARG_INT},
};
#define NUM_RUNTIME_ARGS ((int)(sizeof RUNTIME_ARGS / sizeof RUNTIME_ARGS[0]))

/* Python value of an optional argument (None when absent); NULL with a Python exception set on failure. */
static PyObject *argument_value(const VSMap *in, const char *name, ArgKind kind, const VSAPI *vsapi) {
    int count = vsapi->mapNumElements(in, name);
    if (count < 0)
        Py_RETURN_NONE;
    switch (kind) {
    case ARG_DATA: {
        const char *data = vsapi->mapGetData(in, name, 0, NULL);
        int size = vsapi->mapGetDataSize(in, name, 0, NULL);
        PyObject *value = PyUnicode_DecodeUTF8(data, size, "strict");
        if (!value) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: not valid UTF-8 text", name);
        }
        return value;
    }
    case ARG_INT:
        return PyLong_FromLongLong(vsapi->mapGetInt(in, name, 0, NULL));
    case ARG_INT_ARRAY: {
        PyObject *list = PyList_New(count);
        if (!list)
            return NULL;
        const int64_t *values = vsapi->mapGetIntArray(in, name, NULL);
        for (int i = 0; i < count; i++) {
            PyObject *item = PyLong_FromLongLong(values[i]);
            if (!item) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, item);
        }
        return list;
    }
    }
    Py_RETURN_NONE;
}

/* The keyword arguments of runtime.create(). */
static PyObject *runtime_kwargs(const VSMap *in, const VSVideoInfo *vi, const VSAPI *vsapi) {
    PyObject *kwargs = PyDict_New();
    if (!kwargs)
        return NULL;
    /* The model path is a file name: decode it the way the file system does, so any path that exists works. */
    const char *model = vsapi->mapGetData(in, "model", 0, NULL);
    PyObject *value = PyUnicode_DecodeFSDefaultAndSize(model, vsapi->mapGetDataSize(in, "model", 0, NULL));
    if (!value || PyDict_SetItemString(kwargs, "model", value) < 0)
        goto fail;
    Py_CLEAR(value);
    for (int i = 0; i < NUM_RUNTIME_ARGS; i++) {
        value = argument_value(in, RUNTIME_ARGS[i].name, RUNTIME_ARGS[i].kind, vsapi);
        if (!value || PyDict_SetItemString(kwargs, RUNTIME_ARGS[i].name, value) < 0)
            goto fail;
        Py_CLEAR(value);
    }
    value = PyLong_FromLong(vi->width);
    if (!value || PyDict_SetItemString(kwargs, "width", value) < 0)
        goto fail;
    Py_CLEAR(value);
    value = PyLong_FromLong(vi->height);
    if (!value || PyDict_SetItemString(kwargs, "height", value) < 0)
        goto fail;
    Py_CLEAR(value);
    return kwargs;
fail:
    Py_XDECREF(value);
    Py_DECREF(kwargs);
    return NULL;
}

static int get_int_attribute(PyObject *object, const char *name, long *out) {
    PyObject *value = PyObject_GetAttrString(object, name);
    if (!value)
        return 0;
    *out = PyLong_AsLong(value);
    Py_DECREF(value);
    return !(*out == -1 && PyErr_Occurred());
}

/* runtime.create(...): validates every argument but the clip, opens the bundle and the backend sessions.
 * The GIL is held. On success sets the session, its bound process method, the scale and the stream count. */
static int create_session(const VSMap *in, const VSVideoInfo *vi, const VSAPI *vsapi, PyObject **session,
                          PyObject **process, long *scale, long *num_streams, char *err, size_t err_size) {
    PyObject *module = PyImport_ImportModule(RUNTIME_MODULE);
    if (!module) {
        char *cause = take_python_error(1);
        return copy_error(err, err_size,
                          format_message("%s: cannot import the Python runtime %s (%s); install the selftransfer "
                                         "package into the Python that runs VapourSynth",
                                         FUNC, RUNTIME_MODULE, cause + strlen(FUNC ": ")));
    }
    PyObject *kwargs = runtime_kwargs(in, vi, vsapi);
    PyObject *create = kwargs ? PyObject_GetAttrString(module, "create") : NULL;
    PyObject *no_args = create ? PyTuple_New(0) : NULL;
    *session = no_args ? PyObject_Call(create, no_args, kwargs) : NULL;
    Py_XDECREF(no_args);
    Py_XDECREF(create);
    Py_XDECREF(kwargs);
    Py_DECREF(module);
    if (!*session) {
        /* ValueError (BundleError included) is the runtime's "your argument is wrong" message: show it as is. */
        int user_error = PyErr_ExceptionMatches(PyExc_ValueError);
        return copy_error(err, err_size, take_python_error(!user_error));
    }
    *process = PyObject_GetAttrString(*session, "process");
    if (!*process || !get_int_attribute(*session, "scale", scale) ||
        !get_int_attribute(*session, "num_streams", num_streams)) {
        Py_CLEAR(*process);
        Py_CLEAR(*session);
        return copy_error(err, err_size, take_python_error(1));
    }
    return 1;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* clip checks and colorimetry                                                                                   */

static int check_clip(const VSVideoInfo *vi, const VSAPI *vsapi, char *err, size_t err_size) {
    const VSVideoFormat *f = &vi->format;
    if (f->colorFamily == cfUndefined) {
        snprintf(err, err_size, "%s: clip: variable-format clips are not supported (every frame must have the same "
                                "format; convert with a resize filter first)", FUNC);
        return 0;
    }
    if (vi->width <= 0 || vi->height <= 0) {
        snprintf(err, err_size, "%s: clip: variable-size clips are not supported (every frame must have the same "
                                "size; resize to one size first)", FUNC);
        return 0;
    }
    char name[32] = "";
    vsapi->getVideoFormatName(f, name);
    if (f->colorFamily != cfRGB && f->colorFamily != cfYUV) {
        snprintf(err, err_size, "%s: clip: %s is not supported: the model needs color (an RGB or YUV clip)", FUNC,
                 name);
        return 0;
    }
    int supported = f->sampleType == stInteger ? (f->bitsPerSample >= 8 && f->bitsPerSample <= 16)
                                               : (f->bitsPerSample == 16 || f->bitsPerSample == 32);
    if (!supported) {
        snprintf(err, err_size, "%s: clip: %s is not supported (8-16 bit integer, half or single float samples)",
                 FUNC, name);
        return 0;
    }
    if (vi->numFrames <= 0) {
        snprintf(err, err_size, "%s: clip: the clip has no frames", FUNC);
        return 0;
    }
    return 1;
}

/* How the clip's samples relate to RGB, read once from frame 0 (or the documented defaults). */
typedef struct {
    int matrix;     /* H.273 matrix coefficients; YUV only */
    int full_range; /* 1 = full (PC), 0 = limited (TV) */
    int chromaloc;  /* VSChromaLocation; subsampled YUV only */
} Colorimetry;

static const char *const CHROMA_LOCATIONS[] = {"left", "center", "top_left", "top", "bottom_left", "bottom"};

static int is_subsampled(const VSVideoFormat *f) {
    return f->colorFamily == cfYUV && (f->subSamplingW || f->subSamplingH);
}

/* Defaults when frame 0 says nothing: the matrix is left VSC_MATRIX_UNSPECIFIED for default_matrix() to choose,
 * limited range for YUV and full for RGB, left chroma location (MPEG-2/H.264/HEVC). */
static int read_colorimetry(VSNode *clip, const VSVideoInfo *vi, const VSAPI *vsapi, Colorimetry *c, char *err,
                            size_t err_size) {
    char frame_error[1024] = "";
    const VSFrame *frame = vsapi->getFrame(0, clip, frame_error, sizeof frame_error);
    if (!frame) {
        snprintf(err, err_size, "%s: clip: cannot read frame 0 to learn its colorimetry: %s", FUNC, frame_error);
        return 0;
    }
    const VSMap *props = vsapi->getFramePropertiesRO(frame);
    int is_yuv = vi->format.colorFamily == cfYUV;
    int error = 0, ok = 1;

    int64_t matrix = vsapi->mapGetInt(props, "_Matrix", 0, &error);
    if (error)
        matrix = VSC_MATRIX_UNSPECIFIED;
    c->matrix = (int)matrix;
    int yuv_matrix = matrix == VSC_MATRIX_UNSPECIFIED || (matrix > VSC_MATRIX_RGB && matrix <= VSC_MATRIX_ICTCP);
    if (is_yuv && !yuv_matrix) {
        snprintf(err, err_size, "%s: clip: frame 0 of this YUV clip has _Matrix=%lld, which is not a YUV matrix; fix "
                                "it with std.SetFrameProps(_Matrix=...)", FUNC, (long long)matrix);
        ok = 0;
    }

    int64_t range = vsapi->mapGetInt(props, "_Range", 0, &error);
    if (error)
        range = is_yuv ? VSC_RANGE_LIMITED : VSC_RANGE_FULL;
    c->full_range = range == VSC_RANGE_FULL;
    if (ok && range != VSC_RANGE_FULL && range != VSC_RANGE_LIMITED) {
        snprintf(err, err_size, "%s: clip: frame 0 has an invalid _Range=%lld (1 = full, 0 = limited)", FUNC,
                 (long long)range);
        ok = 0;
    }

    int64_t chromaloc = vsapi->mapGetInt(props, "_ChromaLocation", 0, &error);
    if (error)
        chromaloc = VSC_CHROMA_LEFT;
    c->chromaloc = (int)chromaloc;
    if (ok && is_subsampled(&vi->format) && (chromaloc < VSC_CHROMA_LEFT || chromaloc > VSC_CHROMA_BOTTOM)) {
        snprintf(err, err_size, "%s: clip: frame 0 has an invalid _ChromaLocation=%lld (0-5)", FUNC,
                 (long long)chromaloc);
        ok = 0;
    }
    vsapi->freeFrame(frame);
    return ok;
}

/* The matrix of an untagged YUV clip, from the project's one rule (vs_selftransfer.colour.default_matrix, which the
 * trainer decodes its training frames with), so the model is fed frames converted as the ones it learned from.
 * The GIL is held. */
static int default_matrix(const VSVideoInfo *vi, int *matrix, char *err, size_t err_size) {
    PyObject *module = PyImport_ImportModule(COLOUR_MODULE);
    PyObject *value = module ? PyObject_CallMethod(module, "default_matrix", "ii", vi->width, vi->height) : NULL;
    Py_XDECREF(module);
    long code = value ? PyLong_AsLong(value) : -1;
    Py_XDECREF(value);
    if (code == -1 && PyErr_Occurred()) {
        char *cause = take_python_error(1);
        return copy_error(err, err_size, format_message("%s: cannot get the default YUV matrix from %s (%s)", FUNC,
                                                        COLOUR_MODULE, cause + strlen(FUNC ": ")));
    }
    if (code < VSC_MATRIX_BT709 || code > VSC_MATRIX_ICTCP || code == VSC_MATRIX_UNSPECIFIED || code == 3) {
        snprintf(err, err_size, "%s: %s.default_matrix(%d, %d) returned %ld, not an H.273 YUV matrix code", FUNC,
                 COLOUR_MODULE, vi->width, vi->height, code);
        return 0;
    }
    *matrix = (int)code;
    return 1;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* the conversion graph around the model                                                                         */

/* Invoke a core function; returns its output clip (a new reference) or NULL with err set. Consumes `args`. */
static VSNode *invoke_for_clip(const char *plugin_id, const char *function, VSMap *args, VSCore *core,
                               const VSAPI *vsapi, char *err, size_t err_size) {
    VSPlugin *plugin = vsapi->getPluginByID(plugin_id, core);
    if (!plugin) {
        snprintf(err, err_size, "%s: the core plugin %s is missing", FUNC, plugin_id);
        vsapi->freeMap(args);
        return NULL;
    }
    VSMap *ret = vsapi->invoke(plugin, function, args);
    vsapi->freeMap(args);
    VSNode *node = NULL;
    if (vsapi->mapGetError(ret))
        snprintf(err, err_size, "%s: internal %s failed: %s", FUNC, function, vsapi->mapGetError(ret));
    else
        node = vsapi->mapGetNode(ret, "clip", 0, NULL);
    vsapi->freeMap(ret);
    return node;
}

/* Resize between the clip's format and RGBS at the same size. `to_rgbs` selects the direction; the colorimetry
 * goes into the *_in arguments on the way in and into the output arguments on the way back. */
static VSNode *convert(VSNode *clip, const VSVideoFormat *clip_format, const Colorimetry *c, int to_rgbs,
                       VSCore *core, const VSAPI *vsapi, char *err, size_t err_size) {
    VSMap *args = vsapi->createMap();
    vsapi->mapSetNode(args, "clip", clip, maReplace);
    uint32_t format = to_rgbs ? vsapi->queryVideoFormatID(cfRGB, stFloat, 32, 0, 0, core)
                              : vsapi->queryVideoFormatID(clip_format->colorFamily, clip_format->sampleType,
                                                          clip_format->bitsPerSample, clip_format->subSamplingW,
                                                          clip_format->subSamplingH, core);
    vsapi->mapSetInt(args, "format", format, maReplace);
    const char *range = c->full_range ? "full" : "limited";
    vsapi->mapSetData(args, to_rgbs ? "range_in_s" : "range_s", range, -1, dtUtf8, maReplace);
    if (clip_format->colorFamily == cfYUV)
        vsapi->mapSetInt(args, to_rgbs ? "matrix_in" : "matrix", c->matrix, maReplace);
    if (is_subsampled(clip_format))
        vsapi->mapSetData(args, to_rgbs ? "chromaloc_in_s" : "chromaloc_s", CHROMA_LOCATIONS[c->chromaloc], -1,
                          dtUtf8, maReplace);
    /* Subsampled chroma needs real resampling both ways; everything else is a per-pixel conversion. */
    return invoke_for_clip(VSH_RESIZE_PLUGIN_ID, is_subsampled(clip_format) ? "Bicubic" : "Point", args, core, vsapi,
                           err, err_size);
}

static int is_rgbs(const VSVideoFormat *f) {
    return f->colorFamily == cfRGB && f->sampleType == stFloat && f->bitsPerSample == 32;
}

/* clip -> RGBS with the clip's colorimetry. Per-frame colorimetry props are dropped first so that every frame is
 * decoded exactly as it will be re-encoded (the resizer would otherwise prefer each frame's own props). */
static VSNode *to_rgbs(VSNode *clip, const VSVideoInfo *vi, const Colorimetry *c, VSCore *core, const VSAPI *vsapi,
                       char *err, size_t err_size) {
    if (is_rgbs(&vi->format))
        return vsapi->addNodeRef(clip);
    VSMap *args = vsapi->createMap();
    vsapi->mapSetNode(args, "clip", clip, maReplace);
    vsapi->mapSetData(args, "props", "_Matrix", -1, dtUtf8, maAppend);
    vsapi->mapSetData(args, "props", "_Range", -1, dtUtf8, maAppend);
    vsapi->mapSetData(args, "props", "_ChromaLocation", -1, dtUtf8, maAppend);
    VSNode *plain = invoke_for_clip(VSH_STD_PLUGIN_ID, "RemoveFrameProps", args, core, vsapi, err, err_size);
    if (!plain)
        return NULL;
    VSNode *rgbs = convert(plain, &vi->format, c, 1, core, vsapi, err, err_size);
    vsapi->freeNode(plain);
    if (!rgbs)
        return NULL;
    /* Any problem with the colorimetry (a matrix that needs transfer characteristics, say) shows up now, at script
     * evaluation, rather than on the first frame of an encode. */
    char frame_error[1024] = "";
    const VSFrame *frame = vsapi->getFrame(0, rgbs, frame_error, sizeof frame_error);
    if (!frame) {
        snprintf(err, err_size, "%s: clip: cannot convert it to RGB for the model: %s", FUNC, frame_error);
        vsapi->freeNode(rgbs);
        return NULL;
    }
    vsapi->freeFrame(frame);
    return rgbs;
}

/* A float YUV clip limited to the nominal float ranges, Y in [0, 1] and chroma in [-0.5, 0.5]: RGB in [0, 1]
 * converts into them, but resampling subsampled chroma can overshoot, which an integer format's code range clips
 * too. Consumes `clip`. */
static VSNode *limit_float_yuv(VSNode *clip, VSCore *core, const VSAPI *vsapi, char *err, size_t err_size) {
    VSMap *args = vsapi->createMap();
    vsapi->mapConsumeNode(args, "clip", clip, maReplace);
    const double low[3] = {0.0, -0.5, -0.5}, high[3] = {1.0, 0.5, 0.5};
    vsapi->mapSetFloatArray(args, "min", low, 3);
    vsapi->mapSetFloatArray(args, "max", high, 3);
    return invoke_for_clip(VSH_STD_PLUGIN_ID, "Limiter", args, core, vsapi, err, err_size);
}

/* RGBS model output -> the clip's format, carrying the source frames' properties. Consumes `upscaled`. */
static VSNode *from_rgbs(VSNode *upscaled, VSNode *clip, const VSVideoInfo *vi, const Colorimetry *c, VSCore *core,
                         const VSAPI *vsapi, char *err, size_t err_size) {
    if (is_rgbs(&vi->format))
        return upscaled;
    VSNode *converted = convert(upscaled, &vi->format, c, 0, core, vsapi, err, err_size);
    vsapi->freeNode(upscaled);
    if (converted && vi->format.colorFamily == cfYUV && vi->format.sampleType == stFloat)
        converted = limit_float_yuv(converted, core, vsapi, err, err_size);
    if (!converted)
        return NULL;
    VSMap *args = vsapi->createMap();
    vsapi->mapConsumeNode(args, "clip", converted, maReplace);
    vsapi->mapSetNode(args, "prop_src", clip, maReplace);
    return invoke_for_clip(VSH_STD_PLUGIN_ID, "CopyFrameProps", args, core, vsapi, err, err_size);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Upscale(...)                                                                                                   */

static void VS_CC upscale_create(const VSMap *in, VSMap *out, void *user_data, VSCore *core, const VSAPI *vsapi) {
    char err[ERR_SIZE] = "";
    VSNode *clip = vsapi->mapGetNode(in, "clip", 0, NULL);
    const VSVideoInfo *vi = vsapi->getVideoInfo(clip);
    VSNode *rgbs = NULL, *upscaled = NULL, *result = NULL;
    PyObject *python_objects[2] = {NULL, NULL}; /* session, process */
    UpscaleData *d = NULL;
    Colorimetry color;
    long scale = 0, num_streams = 0;

    /* Everything is checked before anything is built: the clip here, the other arguments in the runtime. */
    if (!check_clip(vi, vsapi, err, sizeof err) || !read_colorimetry(clip, vi, vsapi, &color, err, sizeof err))
        goto fail;
    if (!python_usable()) {
        snprintf(err, sizeof err, "%s: needs a running Python interpreter (use it from a VapourSynth Python script "
                                  "or vspipe)", FUNC);
        goto fail;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int created = (vi->format.colorFamily != cfYUV || color.matrix != VSC_MATRIX_UNSPECIFIED ||
                   default_matrix(vi, &color.matrix, err, sizeof err)) &&
                  create_session(in, vi, vsapi, &python_objects[0], &python_objects[1], &scale, &num_streams, err,
                                 sizeof err);
    PyGILState_Release(gil);
    if (!created)
        goto fail;
    if (scale < 1 || (long)vi->width * scale > INT_MAX / 4 || (long)vi->height * scale > INT_MAX / 4 ||
        num_streams < 1 || num_streams > 1024) {
        snprintf(err, sizeof err, "%s: clip: %dx%d cannot be upscaled %ldx by %ld streams", FUNC, vi->width,
                 vi->height, scale, num_streams);
        goto fail;
    }

    rgbs = to_rgbs(clip, vi, &color, core, vsapi, err, sizeof err);
    if (!rgbs)
        goto fail;

    d = calloc(1, sizeof *d);
    if (!d || !pool_init(&d->pool, (int)num_streams)) {
        snprintf(err, sizeof err, "%s: out of memory", FUNC);
        goto fail;
    }
    d->node = rgbs;
    rgbs = NULL;
    d->vi = *vsapi->getVideoInfo(d->node);
    d->vi.width *= (int)scale;
    d->vi.height *= (int)scale;
    d->session = python_objects[0];
    d->process = python_objects[1];
    python_objects[0] = python_objects[1] = NULL;

    VSFilterDependency deps[] = {{d->node, rpStrictSpatial}};
    upscaled = vsapi->createVideoFilter2("Upscale", &d->vi, upscale_get_frame, upscale_free, fmParallel, deps, 1, d,
                                         core);
    if (!upscaled) {
        snprintf(err, sizeof err, "%s: the core refused the filter (output %dx%d)", FUNC, d->vi.width, d->vi.height);
        upscale_free(d, core, vsapi);
        d = NULL;
        goto fail;
    }
    d = NULL; /* owned by the node now */

    result = from_rgbs(upscaled, clip, vi, &color, core, vsapi, err, sizeof err);
    upscaled = NULL;
    if (!result)
        goto fail;
    vsapi->mapConsumeNode(out, "clip", result, maAppend);
    vsapi->freeNode(clip);
    return;

fail:
    vsapi->mapSetError(out, err);
    if (d) {
        pool_destroy(&d->pool);
        free(d);
    }
    release_python_objects(python_objects, 2);
    vsapi->freeNode(rgbs);
    vsapi->freeNode(clip);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Version()                                                                                                      */

static void set_text(VSMap *out, const char *key, const char *value, const VSAPI *vsapi) {
    vsapi->mapSetData(out, key, value, -1, dtUtf8, maReplace);
}

/* Adds runtime.versions() (library name -> version) and the runtime's path. The GIL is held. */
static void add_python_versions(VSMap *out, const VSAPI *vsapi) {
    set_text(out, "python", Py_GetVersion(), vsapi);
    PyObject *module = PyImport_ImportModule(RUNTIME_MODULE);
    PyObject *path = module ? PyObject_GetAttrString(module, "__file__") : NULL;
    PyObject *versions = path ? PyObject_CallMethod(module, "versions", NULL) : NULL;
    if (!versions) {
        char *cause = take_python_error(1);
        set_text(out, "runtime", cause + strlen(FUNC ": "), vsapi);
        free(cause);
    } else {
        PyObject *path_text = PyUnicode_Check(path) ? printable_utf8(path) : NULL;
        set_text(out, "runtime", path_text ? PyBytes_AS_STRING(path_text) : "?", vsapi);
        Py_XDECREF(path_text);
        PyErr_Clear();
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Check(versions) && PyDict_Next(versions, &pos, &key, &value)) {
            const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
            const char *v = PyUnicode_Check(value) ? PyUnicode_AsUTF8(value) : NULL;
            if (k && v)
                set_text(out, k, v, vsapi);
            PyErr_Clear();
        }
    }
    Py_XDECREF(versions);
    Py_XDECREF(path);
    Py_XDECREF(module);
}

static void VS_CC version_create(const VSMap *in, VSMap *out, void *user_data, VSCore *core, const VSAPI *vsapi) {
    set_text(out, "plugin_version", SELFTRANSFER_VERSION, vsapi);
    char api[32];
    snprintf(api, sizeof api, "%d.%d", VAPOURSYNTH_API_MAJOR, VAPOURSYNTH_API_MINOR);
    set_text(out, "vapoursynth_api", api, vsapi);
    Dl_info info;
    if (dladdr((void *)&version_create, &info) && info.dli_fname)
        set_text(out, "plugin_path", info.dli_fname, vsapi);
    else
        set_text(out, "plugin_path", "?", vsapi);
    if (python_usable()) {
        PyGILState_STATE gil = PyGILState_Ensure();
        add_python_versions(out, vsapi);
        PyGILState_Release(gil);
    } else {
        set_text(out, "python", "not running", vsapi);
        set_text(out, "runtime", "not loaded (no Python interpreter)", vsapi);
    }
}

/* ------------------------------------------------------------------------------------------------------------ */

VS_EXTERNAL_API(void) VapourSynthPluginInit2(VSPlugin *plugin, const VSPLUGINAPI *vspapi) {
    static const char *const type_names[] = {"data", "int", "int[]"};
    static char args[1024];
    size_t used = (size_t)snprintf(args, sizeof args, "clip:vnode;model:data;");
    for (int i = 0; i < NUM_RUNTIME_ARGS && used < sizeof args; i++)
        used += (size_t)snprintf(args + used, sizeof args - used, "%s:%s:opt;", RUNTIME_ARGS[i].name,
                                 type_names[RUNTIME_ARGS[i].kind]);

    vspapi->configPlugin(PLUGIN_ID, "selftransfer", "selftransfer: per-video super-resolution (CARN-M bundles)",
                         VS_MAKE_VERSION(SELFTRANSFER_VERSION_MAJOR, SELFTRANSFER_VERSION_MINOR),
                         VAPOURSYNTH_API_VERSION, 0, plugin);
    vspapi->registerFunction("Upscale", args, "clip:vnode;", upscale_create, NULL, plugin);
    vspapi->registerFunction("Version", "",
                             "plugin_version:data;vapoursynth_api:data;plugin_path:data;python:data;runtime:data;any",
                             version_create, NULL, plugin);
}
