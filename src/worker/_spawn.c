/*
 * worker._spawn: start a job's program with a single exec.
 *
 * The worker runs as root and its jobs as an unprivileged account, each in a
 * cgroup of its own. Without this module a job is started as a chain of
 * programs: /bin/sh to join the cgroup, setpriv to drop to the job's
 * account, then the interpreter. Here one vfork()ed child does all of it
 * itself before it executes the interpreter:
 *
 *   1. every signal back to its default action, then no signal blocked
 *      (raw system calls: glibc's wrappers skip the signals it reserves);
 *   2. joins the job's cgroups (writes "0" to each open cgroup.procs: one
 *      on cgroup v2, one per controller hierarchy on cgroup v1);
 *   3. leads a new session;
 *   4. stdin, stdout and stderr from the given descriptors, every other
 *      descriptor closed on exec;
 *   5. changes to the working directory;
 *   6. drops every supplementary group, then sets real, effective and saved
 *      group and user ids to the job's (when asked to switch), and checks
 *      that no way back to root is left;
 *   7. executes the program.
 *
 * The ids are set with raw system calls: glibc's wrappers would signal the
 * parent's other threads to change theirs too, which a vfork()ed child must
 * never do. With every user id non-zero the kernel clears all capabilities.
 *
 * A step that fails writes the step and errno to a close-on-exec pipe and
 * exits; the parent reaps the child and raises OSError. An empty pipe means
 * the exec succeeded.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* The unified hierarchy and the memory, cpu and pids hierarchies of v1. */
#define MAX_CGROUPS 8

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

enum step {
    STEP_CGROUP = 1,
    STEP_SESSION,
    STEP_STREAMS,
    STEP_DESCRIPTORS,
    STEP_CWD,
    STEP_GROUPS,
    STEP_GID,
    STEP_UID,
    STEP_CHECK,
    STEP_EXEC,
};

static const char *step_text[] = {
    [STEP_CGROUP] = "joining the job's cgroup",
    [STEP_SESSION] = "starting a new session",
    [STEP_STREAMS] = "setting up stdin, stdout and stderr",
    [STEP_DESCRIPTORS] = "closing the worker's descriptors",
    [STEP_CWD] = "changing to the working directory",
    [STEP_GROUPS] = "dropping supplementary groups",
    [STEP_GID] = "switching to the job's group",
    [STEP_UID] = "switching to the job's user",
    [STEP_CHECK] = "checking the job's ids",
    [STEP_EXEC] = "executing",
};

struct failure {
    int step;
    int err;
};

struct plan {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int stdin_fd;
    int stdout_fd;
    int cgroup_fds[MAX_CGROUPS];
    int n_cgroups;
    long uid; /* -1: keep the worker's */
    long gid;
    int report_fd;
};

static int
close_range_cloexec(unsigned int first)
{
    return (int)syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC);
}

/* The descriptor as ``target``, not closed on exec. */
static int
place(int fd, int target)
{
    if (fd == target) {
        int flags = fcntl(fd, F_GETFD);
        return flags < 0 ? -1 : fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
    }
    return dup2(fd, target) < 0 ? -1 : 0;
}

/* Runs in the vfork()ed child: only async-signal-safe calls, no allocation. */
static void __attribute__((noreturn))
child(const struct plan *p)
{
    struct failure f = {0, 0};
    /* The kernel's struct sigaction: glibc's wrapper refuses the signals it
       keeps for itself (32 and 33), which may be ignored too. */
    struct {
        void (*handler)(int);
        unsigned long flags;
        void (*restorer)(void);
        unsigned long mask;
    } dfl;
    unsigned long none = 0;
    int sig, i;

    memset(&dfl, 0, sizeof dfl);
    dfl.handler = SIG_DFL;
    for (sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            (void)syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
    }
    (void)syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none);

    for (i = 0; i < p->n_cgroups; i++) {
        if (write(p->cgroup_fds[i], "0", 1) != 1) {
            f.step = STEP_CGROUP;
            goto fail;
        }
    }
    if (setsid() < 0) {
        f.step = STEP_SESSION;
        goto fail;
    }
    if (place(p->stdin_fd, 0) < 0 || place(p->stdout_fd, 1) < 0 ||
        place(p->stdout_fd, 2) < 0) {
        f.step = STEP_STREAMS;
        goto fail;
    }
    if (close_range_cloexec(3) < 0) {
        f.step = STEP_DESCRIPTORS;
        goto fail;
    }
    if (p->cwd != NULL && chdir(p->cwd) < 0) {
        f.step = STEP_CWD;
        goto fail;
    }
    if (p->uid >= 0) {
        uid_t r, e, s;
        gid_t gr, ge, gs;

        if (syscall(SYS_setgroups, 0, NULL) < 0) {
            f.step = STEP_GROUPS;
            goto fail;
        }
        if (syscall(SYS_setresgid, (gid_t)p->gid, (gid_t)p->gid, (gid_t)p->gid) < 0) {
            f.step = STEP_GID;
            goto fail;
        }
        if (syscall(SYS_setresuid, (uid_t)p->uid, (uid_t)p->uid, (uid_t)p->uid) < 0) {
            f.step = STEP_UID;
            goto fail;
        }
        /* Nothing may be left that leads back: not an id, not a group. */
        if (syscall(SYS_getresuid, &r, &e, &s) < 0 || syscall(SYS_getresgid, &gr, &ge, &gs) < 0 ||
            r != (uid_t)p->uid || e != r || s != r || gr != (gid_t)p->gid || ge != gr ||
            gs != gr || syscall(SYS_getgroups, 0, NULL) != 0 ||
            syscall(SYS_setresuid, 0, 0, 0) == 0) {
            f.step = STEP_CHECK;
            errno = EPERM;
            goto fail;
        }
    }
    execve(p->path, p->argv, p->envp);
    f.step = STEP_EXEC;
fail:
    f.err = errno;
    (void)!write(p->report_fd, &f, sizeof f);
    _exit(127);
}

/* vfork() in a frame of its own: the caller's locals are safe from it. */
static pid_t __attribute__((noinline))
start_child(const struct plan *p, int *err)
{
    sigset_t all, old;
    pid_t pid;

    /* No signal may reach the child while it still shares our memory and
       our handlers; it unblocks them once they are all back to default. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(p);
    *err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid;
}

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

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, cwd, stdin_fd, stdout_fd, cgroup_fds, uid, gid) -> pid\n\n"
"Start ``path`` with ``argv`` and ``envp`` (lists of bytes) in ``cwd`` (bytes or\n"
"None) as the leader of a new session, stdin from ``stdin_fd``, stdout and\n"
"stderr to ``stdout_fd``, no other descriptor. ``cgroup_fds``: a tuple of open\n"
"cgroup.procs files (at most 8) the child joins first. ``uid`` and ``gid``\n"
">= 0: the child's\n"
"only ids, without supplementary groups. Raises OSError if any step fails\n"
"(the child is reaped).");

static PyObject *
spawn(PyObject *self, PyObject *args)
{
    PyObject *argv_obj, *envp_obj, *cwd_obj, *cgroups_obj, *result = NULL;
    const char *path;
    struct plan p;
    char **argv = NULL, **envp = NULL;
    int pipe_fds[2] = {-1, -1};
    pid_t pid;
    int saved_errno;
    struct failure f = {0, 0};
    ssize_t got;
    Py_ssize_t i;

    (void)self;
    memset(&p, 0, sizeof p);
    if (!PyArg_ParseTuple(args, "yOOOiiO!ll:spawn", &path, &argv_obj, &envp_obj, &cwd_obj,
                          &p.stdin_fd, &p.stdout_fd, &PyTuple_Type, &cgroups_obj, &p.uid,
                          &p.gid))
        return NULL;
    if (PyTuple_GET_SIZE(cgroups_obj) > MAX_CGROUPS) {
        PyErr_SetString(PyExc_ValueError, "cgroup_fds has more than 8 descriptors");
        return NULL;
    }
    for (i = 0; i < PyTuple_GET_SIZE(cgroups_obj); i++) {
        int fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(cgroups_obj, i));
        if (fd < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "cgroup_fds must be descriptors");
            return NULL;
        }
        p.cgroup_fds[p.n_cgroups++] = fd;
    }
    if (p.stdin_fd < 0 || p.stdout_fd < 0 || (p.uid < 0) != (p.gid < 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "stdin_fd and stdout_fd are needed; uid and gid go together");
        return NULL;
    }
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
    if (pipe2(pipe_fds, O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    p.report_fd = pipe_fds[1];

    Py_BEGIN_ALLOW_THREADS
    pid = start_child(&p, &saved_errno);
    close(pipe_fds[1]);
    pipe_fds[1] = -1;
    if (pid > 0) {
        do {
            got = read(pipe_fds[0], &f, sizeof f);
        } while (got < 0 && errno == EINTR);
        if (got != 0) {
            /* The child failed before or in exec (or the report is torn):
               it has exited or is about to; reap it. */
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
            if (got != (ssize_t)sizeof f) {
                f.step = STEP_EXEC;
                f.err = got < 0 ? errno : EIO;
            }
        }
    }
    Py_END_ALLOW_THREADS

    if (pid < 0) {
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (f.step == STEP_EXEC) {
        PyObject *name = PyBytes_FromString(path);
        if (name != NULL) {
            errno = f.err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
            Py_DECREF(name);
        }
    } else if (f.step != 0) {
        /* OSError(errno, "<step>: <strerror>"); its subclass by errno. */
        PyObject *err = PyObject_CallFunction(PyExc_OSError, "iN", f.err,
                                              PyUnicode_FromFormat("%s: %s", step_text[f.step],
                                                                   strerror(f.err)));
        if (err != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
            Py_DECREF(err);
        }
    } else {
        result = PyLong_FromLong((long)pid);
    }
out:
    if (pipe_fds[0] >= 0)
        close(pipe_fds[0]);
    PyMem_Free(argv);
    PyMem_Free(envp);
    return result;
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
