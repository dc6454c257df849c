/*
 * worker._spawn: start a job's program with a single exec.
 *
 * The worker runs as root and its jobs as an unprivileged account, each in a
 * cgroup of its own. Without this module a job is started as a chain of
 * programs: /bin/sh to join the cgroup, setpriv to drop to the job's
 * account, then the interpreter. Here one vfork()ed child does all of it
 * itself before it executes the interpreter: it joins the cgroups, leads a
 * new session, takes its stdin, stdout and stderr, drops to the job's ids
 * and executes the program. The steps are in jobchild.h, which the keeper
 * (keeper.c) shares: it starts jobs the same way.
 *
 * A step that fails is reported by the child before it exits; the parent
 * reaps it and raises OSError.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "jobchild.h"

/* A NULL-terminated array of the bytes in ``seq`` (a list or tuple of bytes). */
static char **
byte_array(PyObject *seq, const char *what)
{
    Py_ssize_t n, i;
    char **out;

    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of bytes", what);
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        char *s;
        Py_ssize_t len;

        if (!PyBytes_Check(item) || PyBytes_AsStringAndSize(item, &s, &len) < 0 ||
            (Py_ssize_t)strlen(s) != len) {
            PyMem_Free(out);
            PyErr_Format(PyExc_ValueError, "%s[%zd] must be bytes without NUL", what, i);
            return NULL;
        }
        out[i] = s; /* borrowed: ``seq`` outlives the array */
    }
    return out;
}

/*
 * The OSError for a start that failed at ``step`` with ``err``: what exec met,
 * with the program's path, or "<step>: <strerror>" for the steps before it;
 * step 0 (no child could be started): errno's own. Calling OSError picks its
 * subclass by errno (FileNotFoundError...).
 */
static PyObject *
failure_error(int step, int err, PyObject *path)
{
    if (step == STEP_EXEC)
        return PyObject_CallFunction(PyExc_OSError, "isO", err, strerror(err), path);
    if (step > 0 && step < STEP_COUNT)
        return PyObject_CallFunction(PyExc_OSError, "iN", err,
                                     PyUnicode_FromFormat("%s: %s", step_text[step],
                                                          strerror(err)));
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* The descriptors in ``tuple`` into ``out`` (room for ``max``); -1 if any is
   not one. */
static int
descriptors(PyObject *tuple, int *out, int max, const char *what)
{
    Py_ssize_t i, n = PyTuple_GET_SIZE(tuple);

    if (n > max) {
        PyErr_Format(PyExc_ValueError, "%s has more than %d descriptors", what, max);
        return -1;
    }
    for (i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(tuple, i));
        if (fd < 0 || fd > INT_MAX) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s must be descriptors", what);
            return -1;
        }
        out[i] = (int)fd;
    }
    return (int)n;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, cwd, stdin_fd, stdout_fd, cgroup_fds, uid, gid,\n"
"      pass_fds=(), stderr_fd=-1) -> pid\n\n"
"Start ``path`` with ``argv`` and ``envp`` (lists of bytes) in ``cwd`` (bytes or\n"
"None) as the leader of a new session, stdin from ``stdin_fd``, stdout and\n"
"stderr to ``stdout_fd`` (stderr to ``stderr_fd`` instead if that is >= 0),\n"
"no other descriptor but those in ``pass_fds`` (at most 16, kept under their\n"
"numbers). ``cgroup_fds``: a tuple of open cgroup.procs files (at most 8) the\n"
"child joins first. ``uid`` and ``gid`` >= 0: the child's only ids, without\n"
"supplementary groups. Raises OSError if any step fails (the child is\n"
"reaped).");

static PyObject *
spawn(PyObject *self, PyObject *args)
{
    PyObject *argv_obj, *envp_obj, *cwd_obj, *cgroups_obj, *pass_obj = NULL;
    PyObject *result = NULL;
    const char *path;
    struct plan p;
    char **argv = NULL, **envp = NULL;
    pid_t pid;
    struct failure f;
    int n;

    (void)self;
    memset(&p, 0, sizeof p);
    p.stderr_fd = -1;
    if (!PyArg_ParseTuple(args, "yOOOiiO!ll|O!i:spawn", &path, &argv_obj, &envp_obj,
                          &cwd_obj, &p.stdin_fd, &p.stdout_fd, &PyTuple_Type, &cgroups_obj,
                          &p.uid, &p.gid, &PyTuple_Type, &pass_obj, &p.stderr_fd))
        return NULL;
    if ((n = descriptors(cgroups_obj, p.cgroup_fds, MAX_CGROUPS, "cgroup_fds")) < 0)
        return NULL;
    p.n_cgroups = n;
    if (pass_obj != NULL) {
        if ((n = descriptors(pass_obj, p.pass_fds, MAX_PASS_FDS, "pass_fds")) < 0)
            return NULL;
        p.n_pass = n;
    }
    if (p.stdin_fd < 0 || p.stdout_fd < 0 || (p.uid < 0) != (p.gid < 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "stdin_fd and stdout_fd are needed; uid and gid go together");
        return NULL;
    }
    /* Unless told otherwise, stderr shares stdout (a job's output is both). */
    if (p.stderr_fd < 0)
        p.stderr_fd = p.stdout_fd;
    if (cwd_obj != Py_None && !PyBytes_Check(cwd_obj)) {
        PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
        return NULL;
    }
    p.path = path;
    p.cwd = cwd_obj == Py_None ? NULL : PyBytes_AS_STRING(cwd_obj);
    if ((argv = byte_array(argv_obj, "argv")) == NULL)
        goto out;
    if (argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto out;
    }
    if ((envp = byte_array(envp_obj, "envp")) == NULL)
        goto out;
    p.argv = argv;
    p.envp = envp;

    Py_BEGIN_ALLOW_THREADS
    pid = launch(&p, &f);
    Py_END_ALLOW_THREADS

    if (pid > 0) {
        result = PyLong_FromLong((long)pid);
    } else {
        PyObject *name = PyBytes_FromString(path);
        PyObject *err = name == NULL ? NULL : failure_error(f.step, f.err, name);
        if (err != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
            Py_DECREF(err);
        }
        Py_XDECREF(name);
    }
out:
    PyMem_Free(argv);
    PyMem_Free(envp);
    return result;
}

PyDoc_STRVAR(failure_doc,
"failure(step, errno, path) -> OSError\n\n"
"The OSError spawn() raises for a child that failed at ``step`` with\n"
"``errno``, for a start reported by number (the keeper's report): the step\n"
"numbers of jobchild.h, 0 for a start where no child ran. ``path`` (bytes)\n"
"is the program's, named by an exec failure.");

static PyObject *
failure(PyObject *self, PyObject *args)
{
    int step, err;
    PyObject *path;

    (void)self;
    if (!PyArg_ParseTuple(args, "iiO!:failure", &step, &err, &PyBytes_Type, &path))
        return NULL;
    if (step < 0 || step >= STEP_COUNT) {
        PyErr_Format(PyExc_ValueError, "no step %d", step);
        return NULL;
    }
    return failure_error(step, err, path);
}

PyDoc_STRVAR(supported_doc,
"supported() -> None\n\n"
"Raise OSError if this kernel lacks what spawn() needs (close_range with\n"
"CLOSE_RANGE_CLOEXEC: Linux 5.11 or newer).");

static PyObject *
supported(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    /* A range past every descriptor: changes nothing, fails if unsupported. */
    if (syscall(SYS_close_range, ~0U - 1, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {"failure", failure, METH_VARARGS, failure_doc},
    {"supported", supported, METH_NOARGS, supported_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "worker._spawn",
    .m_doc = "Start a job's program with one exec (see the comment in _spawn.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    return PyModule_Create(&module);
}
