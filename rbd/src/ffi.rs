//! The librados/librbd C API, loaded at run time: the one module of this
//! crate with `unsafe`.
//!
//! The declarations are written by hand from Debian's `librbd-dev` /
//! `librados-dev` 16.2 headers (`rbd/librbd.h`, `rados/librados.h`), for
//! the few calls snapsync makes; nothing Ceph is needed to build. The
//! libraries are opened with `dlopen` ([`libloading`]) when a caller first
//! connects, so a host without `librbd1` runs every non-RBD command.
//!
//! Every wrapper returns the C call's negative errno as `Err(errno)`; the
//! safe API in `lib.rs` turns that into errors naming the image.
//! librados and librbd are thread-safe (a `rados_t`, an `rados_ioctx_t` and
//! an open `rbd_image_t` may be used from several threads at once: librbd
//! serialises what must be serialised behind its own locks), which is what
//! the `Send`/`Sync` impls below rely on.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::Arc;

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;

/// `rbd_snap_info_t`.
#[repr(C)]
struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_image_watcher_t`.
#[repr(C)]
struct ImageWatcher {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

type DiffCb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// The loaded functions. The `Library` handles keep them mapped.
struct Fns {
    rados_create2: unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    rados_ioctx_set_namespace: unsafe extern "C" fn(IoctxT, *const c_char),
    rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),

    rbd_create2: unsafe extern "C" fn(IoctxT, *const c_char, u64, u64, *mut c_int) -> c_int,
    rbd_remove: unsafe extern "C" fn(IoctxT, *const c_char) -> c_int,
    rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_resize: unsafe extern "C" fn(ImageT, u64) -> c_int,
    rbd_read2: unsafe extern "C" fn(ImageT, u64, usize, *mut c_char, c_int) -> isize,
    rbd_write2: unsafe extern "C" fn(ImageT, u64, usize, *const c_char, c_int) -> isize,
    rbd_discard: unsafe extern "C" fn(ImageT, u64, u64) -> c_int,
    rbd_write_zeroes: unsafe extern "C" fn(ImageT, u64, usize, c_int, c_int) -> isize,
    rbd_flush: unsafe extern "C" fn(ImageT) -> c_int,
    /// `rbd_lock_mode_t` is a C enum (an int); 0 is RBD_LOCK_MODE_EXCLUSIVE.
    rbd_lock_acquire: unsafe extern "C" fn(ImageT, c_int) -> c_int,
    rbd_get_id: unsafe extern "C" fn(ImageT, *mut c_char, usize) -> c_int,
    rbd_snap_create: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_remove: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_rollback: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_list: unsafe extern "C" fn(ImageT, *mut SnapInfo, *mut c_int) -> c_int,
    rbd_snap_list_end: unsafe extern "C" fn(*mut SnapInfo),
    rbd_diff_iterate2:
        unsafe extern "C" fn(ImageT, *const c_char, u64, u64, u8, u8, DiffCb, *mut c_void) -> c_int,
    rbd_metadata_get: unsafe extern "C" fn(ImageT, *const c_char, *mut c_char, *mut usize) -> c_int,
    rbd_metadata_set: unsafe extern "C" fn(ImageT, *const c_char, *const c_char) -> c_int,
    rbd_metadata_remove: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_watchers_list: unsafe extern "C" fn(ImageT, *mut ImageWatcher, *mut usize) -> c_int,
    rbd_watchers_list_cleanup: unsafe extern "C" fn(*mut ImageWatcher, usize),
    rbd_lock_get_owners:
        unsafe extern "C" fn(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int,
    rbd_lock_get_owners_cleanup: unsafe extern "C" fn(*mut *mut c_char, usize),
}

/// The two libraries, opened.
pub(crate) struct Lib {
    fns: Fns,
    _rados: libloading::Library,
    _rbd: libloading::Library,
}

impl std::fmt::Debug for Lib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lib(librados, librbd)")
    }
}

/// Why the libraries could not be loaded: which file, and the loader's words.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub library: String,
    pub detail: String,
}

fn open(name: &str) -> Result<libloading::Library, LoadError> {
    // SAFETY: loading runs the library's initialisers. librados/librbd are
    // ordinary shared libraries whose initialisers only set up their own
    // globals; they do not depend on state of this process.
    unsafe { libloading::Library::new(name) }.map_err(|e| LoadError {
        library: name.to_string(),
        detail: e.to_string(),
    })
}

/// Looks up `$name` in `$lib` as the fn-pointer type of the `Fns` field.
macro_rules! sym {
    ($lib:expr, $libname:expr, $name:ident) => {{
        // SAFETY: the symbol's type is the field's type, written from the
        // C prototype in the 16.2 headers; the pointer is copied out but
        // stays valid because `Lib` keeps the `Library` alive as long as
        // the `Fns` that holds it.
        let s = unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }.map_err(|e| {
            LoadError {
                library: $libname.to_string(),
                detail: format!("{}: {e}", stringify!($name)),
            }
        })?;
        *s
    }};
}

impl Lib {
    pub(crate) fn load(rados_name: &str, rbd_name: &str) -> Result<Arc<Lib>, LoadError> {
        let rados = open(rados_name)?;
        let rbd = open(rbd_name)?;
        let (r, b) = (rados_name, rbd_name);
        let fns = Fns {
            rados_create2: sym!(rados, r, rados_create2),
            rados_conf_read_file: sym!(rados, r, rados_conf_read_file),
            rados_conf_set: sym!(rados, r, rados_conf_set),
            rados_connect: sym!(rados, r, rados_connect),
            rados_shutdown: sym!(rados, r, rados_shutdown),
            rados_ioctx_create: sym!(rados, r, rados_ioctx_create),
            rados_ioctx_set_namespace: sym!(rados, r, rados_ioctx_set_namespace),
            rados_ioctx_destroy: sym!(rados, r, rados_ioctx_destroy),
            rbd_create2: sym!(rbd, b, rbd_create2),
            rbd_remove: sym!(rbd, b, rbd_remove),
            rbd_open: sym!(rbd, b, rbd_open),
            rbd_open_read_only: sym!(rbd, b, rbd_open_read_only),
            rbd_close: sym!(rbd, b, rbd_close),
            rbd_get_size: sym!(rbd, b, rbd_get_size),
            rbd_resize: sym!(rbd, b, rbd_resize),
            rbd_read2: sym!(rbd, b, rbd_read2),
            rbd_write2: sym!(rbd, b, rbd_write2),
            rbd_discard: sym!(rbd, b, rbd_discard),
            rbd_write_zeroes: sym!(rbd, b, rbd_write_zeroes),
            rbd_flush: sym!(rbd, b, rbd_flush),
            rbd_lock_acquire: sym!(rbd, b, rbd_lock_acquire),
            rbd_get_id: sym!(rbd, b, rbd_get_id),
            rbd_snap_create: sym!(rbd, b, rbd_snap_create),
            rbd_snap_remove: sym!(rbd, b, rbd_snap_remove),
            rbd_snap_rollback: sym!(rbd, b, rbd_snap_rollback),
            rbd_snap_list: sym!(rbd, b, rbd_snap_list),
            rbd_snap_list_end: sym!(rbd, b, rbd_snap_list_end),
            rbd_diff_iterate2: sym!(rbd, b, rbd_diff_iterate2),
            rbd_metadata_get: sym!(rbd, b, rbd_metadata_get),
            rbd_metadata_set: sym!(rbd, b, rbd_metadata_set),
            rbd_metadata_remove: sym!(rbd, b, rbd_metadata_remove),
            rbd_watchers_list: sym!(rbd, b, rbd_watchers_list),
            rbd_watchers_list_cleanup: sym!(rbd, b, rbd_watchers_list_cleanup),
            rbd_lock_get_owners: sym!(rbd, b, rbd_lock_get_owners),
            rbd_lock_get_owners_cleanup: sym!(rbd, b, rbd_lock_get_owners_cleanup),
        };
        Ok(Arc::new(Lib {
            fns,
            _rados: rados,
            _rbd: rbd,
        }))
    }
}

/// A negative return as a positive errno.
fn check(ret: c_int) -> Result<c_int, i32> {
    if ret < 0 {
        Err(-ret)
    } else {
        Ok(ret)
    }
}

fn check_size(ret: isize) -> Result<usize, i32> {
    if ret < 0 {
        Err(i32::try_from(-ret).unwrap_or(EIO))
    } else {
        Ok(ret as usize)
    }
}

// errno values of Linux (asm-generic/errno-base.h); librbd returns them
// negated.
const EIO: i32 = 5;
const ERANGE: i32 = 34;
const ENOENT: i32 = 2;

/// `LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL` would be a hint; none is passed.
const NO_OP_FLAGS: c_int = 0;

/// A connected cluster handle (`rados_t`), shut down on drop.
pub(crate) struct RawCluster {
    lib: Arc<Lib>,
    handle: RadosT,
}

// SAFETY: librados documents `rados_t` as safe to use from several threads;
// the handle is only freed in `Drop`, which has exclusive access.
unsafe impl Send for RawCluster {}
// SAFETY: as above: concurrent calls on one `rados_t` are allowed.
unsafe impl Sync for RawCluster {}

impl RawCluster {
    /// `rados_create2` + config + `rados_connect`. `user` is the cephx id
    /// without `client.` (e.g. `admin`).
    pub(crate) fn connect(
        lib: Arc<Lib>,
        user: &CStr,
        conf_file: Option<&CStr>,
        options: &[(CString, CString)],
    ) -> Result<RawCluster, (&'static str, i32)> {
        let mut handle: RadosT = ptr::null_mut();
        let name = CString::new(format!("client.{}", user.to_string_lossy()))
            .map_err(|_| ("rados_create2", 22))?;
        // SAFETY: `handle` is a valid out pointer; the strings are NUL
        // terminated and outlive the call; "ceph" is the cluster name.
        let ret =
            unsafe { (lib.fns.rados_create2)(&mut handle, c"ceph".as_ptr(), name.as_ptr(), 0) };
        check(ret).map_err(|e| ("rados_create2", e))?;
        let cluster = RawCluster { lib, handle };
        // With no path librados reads $CEPH_CONF, then the default places.
        let path = conf_file.map_or(ptr::null(), CStr::as_ptr);
        // SAFETY: the handle is live (created above, not yet shut down);
        // `path` is NULL or a NUL-terminated string that outlives the call.
        let ret = unsafe { (cluster.lib.fns.rados_conf_read_file)(cluster.handle, path) };
        check(ret).map_err(|e| ("rados_conf_read_file", e))?;
        for (k, v) in options {
            // SAFETY: live handle, NUL-terminated strings outliving the call.
            let ret =
                unsafe { (cluster.lib.fns.rados_conf_set)(cluster.handle, k.as_ptr(), v.as_ptr()) };
            check(ret).map_err(|e| ("rados_conf_set", e))?;
        }
        // SAFETY: live, configured, not yet connected handle.
        let ret = unsafe { (cluster.lib.fns.rados_connect)(cluster.handle) };
        check(ret).map_err(|e| ("rados_connect", e))?;
        Ok(cluster)
    }

    /// An IO context on `pool`, in `namespace` when given.
    pub(crate) fn ioctx(
        self: &Arc<Self>,
        pool: &CStr,
        namespace: Option<&CStr>,
    ) -> Result<RawIoctx, i32> {
        let mut io: IoctxT = ptr::null_mut();
        // SAFETY: live connected handle; `pool` NUL-terminated; `io` a
        // valid out pointer.
        check(unsafe { (self.lib.fns.rados_ioctx_create)(self.handle, pool.as_ptr(), &mut io) })?;
        let ioctx = RawIoctx {
            cluster: Arc::clone(self),
            handle: io,
        };
        if let Some(ns) = namespace {
            // SAFETY: `io` was just created; `ns` is NUL-terminated and
            // librados copies it.
            unsafe { (self.lib.fns.rados_ioctx_set_namespace)(ioctx.handle, ns.as_ptr()) };
        }
        Ok(ioctx)
    }
}

impl Drop for RawCluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is shut down once;
        // every ioctx holds an `Arc` of this cluster, so none is left.
        unsafe { (self.lib.fns.rados_shutdown)(self.handle) };
    }
}

/// A pool (and namespace) IO context, destroyed on drop.
pub(crate) struct RawIoctx {
    cluster: Arc<RawCluster>,
    handle: IoctxT,
}

// SAFETY: librados IO contexts may be used from several threads as long as
// their settings (namespace) are not changed concurrently; the namespace is
// set once, before the value is shared.
unsafe impl Send for RawIoctx {}
// SAFETY: as above.
unsafe impl Sync for RawIoctx {}

impl Drop for RawIoctx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed once; every image
        // opened through it holds an `Arc` of it, so none is left open.
        unsafe { (self.fns().rados_ioctx_destroy)(self.handle) };
    }
}

impl RawIoctx {
    fn fns(&self) -> &Fns {
        &self.cluster.lib.fns
    }

    /// `rbd_create2` with explicit features; `order` 0 = default (4 MiB objects).
    pub(crate) fn create(&self, name: &CStr, size: u64, features: u64) -> Result<(), i32> {
        let mut order: c_int = 0;
        // SAFETY: live ioctx; NUL-terminated name; `order` a valid in/out
        // pointer.
        check(unsafe {
            (self.fns().rbd_create2)(self.handle, name.as_ptr(), size, features, &mut order)
        })
        .map(drop)
    }

    pub(crate) fn remove(&self, name: &CStr) -> Result<(), i32> {
        // SAFETY: live ioctx; NUL-terminated name.
        check(unsafe { (self.fns().rbd_remove)(self.handle, name.as_ptr()) }).map(drop)
    }

    /// Opens the image head (read-write, or read-only), or a snapshot
    /// read-only when `snap` is given.
    pub(crate) fn open(
        self: &Arc<Self>,
        name: &CStr,
        snap: Option<&CStr>,
        read_only: bool,
    ) -> Result<RawImage, i32> {
        let mut image: ImageT = ptr::null_mut();
        let snap_ptr = snap.map_or(ptr::null(), CStr::as_ptr);
        let f = if read_only || snap.is_some() {
            self.fns().rbd_open_read_only
        } else {
            self.fns().rbd_open
        };
        // SAFETY: live ioctx; NUL-terminated name; `snap_ptr` NULL or
        // NUL-terminated; `image` a valid out pointer.
        check(unsafe { f(self.handle, name.as_ptr(), &mut image, snap_ptr) })?;
        Ok(RawImage {
            ioctx: Arc::clone(self),
            handle: image,
        })
    }
}

/// An open image, closed on drop.
pub(crate) struct RawImage {
    ioctx: Arc<RawIoctx>,
    handle: ImageT,
}

// SAFETY: an open `rbd_image_t` may be used from several threads at once
// (librbd's ImageCtx guards its state with its own locks; `rbd bench` and
// qemu issue IO on one handle from many threads).
unsafe impl Send for RawImage {}
// SAFETY: as above.
unsafe impl Sync for RawImage {}

impl Drop for RawImage {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed exactly once here.
        unsafe { (self.fns().rbd_close)(self.handle) };
    }
}

/// What `rbd_diff_iterate2` reports: an extent that changed, and whether it
/// now holds data (`exists == false`: discarded/zeroed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    pub exists: bool,
}

extern "C" fn diff_cb(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&mut Vec<DiffExtent>` that `diff` passed in, alive
    // and not otherwise borrowed for the duration of rbd_diff_iterate2, which
    // calls back on the calling thread only.
    let out = unsafe { &mut *(arg as *mut Vec<DiffExtent>) };
    out.push(DiffExtent {
        offset,
        len: len as u64,
        exists: exists != 0,
    });
    0
}

impl RawImage {
    fn fns(&self) -> &Fns {
        &self.ioctx.cluster.lib.fns
    }

    pub(crate) fn size(&self) -> Result<u64, i32> {
        let mut size = 0u64;
        // SAFETY: open image; `size` a valid out pointer.
        check(unsafe { (self.fns().rbd_get_size)(self.handle, &mut size) })?;
        Ok(size)
    }

    pub(crate) fn resize(&self, size: u64) -> Result<(), i32> {
        // SAFETY: open image.
        check(unsafe { (self.fns().rbd_resize)(self.handle, size) }).map(drop)
    }

    /// One read; returns how many bytes were read (short only at the end).
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, i32> {
        // SAFETY: open image; `buf` is valid for writes of `buf.len()` bytes
        // and exclusively borrowed for the call.
        check_size(unsafe {
            (self.fns().rbd_read2)(
                self.handle,
                offset,
                buf.len(),
                buf.as_mut_ptr().cast(),
                NO_OP_FLAGS,
            )
        })
    }

    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> Result<usize, i32> {
        // SAFETY: open image; `buf` valid for reads of `buf.len()` bytes.
        check_size(unsafe {
            (self.fns().rbd_write2)(
                self.handle,
                offset,
                buf.len(),
                buf.as_ptr().cast(),
                NO_OP_FLAGS,
            )
        })
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), i32> {
        // SAFETY: open image.
        check(unsafe { (self.fns().rbd_discard)(self.handle, offset, len) }).map(drop)
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: usize) -> Result<usize, i32> {
        // SAFETY: open image; no buffer involved.
        check_size(unsafe {
            (self.fns().rbd_write_zeroes)(self.handle, offset, len, 0, NO_OP_FLAGS)
        })
    }

    pub(crate) fn flush(&self) -> Result<(), i32> {
        // SAFETY: open image.
        check(unsafe { (self.fns().rbd_flush)(self.handle) }).map(drop)
    }

    /// Takes the exclusive lock and keeps it (no transfer to another
    /// client) until the image is closed.
    pub(crate) fn lock_exclusive(&self) -> Result<(), i32> {
        const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
        // SAFETY: open image; the mode is a valid rbd_lock_mode_t value.
        check(unsafe { (self.fns().rbd_lock_acquire)(self.handle, RBD_LOCK_MODE_EXCLUSIVE) })
            .map(drop)
    }

    pub(crate) fn id(&self) -> Result<String, i32> {
        let mut len = 64usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: open image; `buf` valid for `len` bytes of writes.
            let ret = unsafe { (self.fns().rbd_get_id)(self.handle, buf.as_mut_ptr().cast(), len) };
            match check(ret) {
                Ok(_) => return Ok(c_string(&buf)),
                Err(ERANGE) if len < 1 << 16 => len *= 4,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn snap_create(&self, name: &CStr) -> Result<(), i32> {
        // SAFETY: open image; NUL-terminated name.
        check(unsafe { (self.fns().rbd_snap_create)(self.handle, name.as_ptr()) }).map(drop)
    }

    pub(crate) fn snap_remove(&self, name: &CStr) -> Result<(), i32> {
        // SAFETY: open image; NUL-terminated name.
        check(unsafe { (self.fns().rbd_snap_remove)(self.handle, name.as_ptr()) }).map(drop)
    }

    pub(crate) fn snap_rollback(&self, name: &CStr) -> Result<(), i32> {
        // SAFETY: open image; NUL-terminated name.
        check(unsafe { (self.fns().rbd_snap_rollback)(self.handle, name.as_ptr()) }).map(drop)
    }

    /// (id, size, name) of every snapshot, oldest first.
    pub(crate) fn snap_list(&self) -> Result<Vec<(u64, u64, String)>, i32> {
        let mut max: c_int = 16;
        loop {
            let mut infos: Vec<SnapInfo> = (0..max)
                .map(|_| SnapInfo {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: open image; `infos` has room for `max` entries, which
            // is what `max` tells librbd; on -ERANGE librbd writes the
            // needed count to `max` and fills nothing.
            let ret =
                unsafe { (self.fns().rbd_snap_list)(self.handle, infos.as_mut_ptr(), &mut max) };
            match check(ret) {
                Ok(n) => {
                    let n = n as usize;
                    let out = infos[..n]
                        .iter()
                        .map(|s| {
                            // SAFETY: librbd set `name` of the first `n`
                            // entries to NUL-terminated strings it owns
                            // until rbd_snap_list_end.
                            let name = unsafe { CStr::from_ptr(s.name) }
                                .to_string_lossy()
                                .into_owned();
                            (s.id, s.size, name)
                        })
                        .collect();
                    // SAFETY: frees the names of the filled entries; librbd
                    // asked for room for one more entry and wrote a NULL
                    // name there, which is where rbd_snap_list_end stops.
                    unsafe { (self.fns().rbd_snap_list_end)(infos.as_mut_ptr()) };
                    return Ok(out);
                }
                // librbd wrote the count it needs (names + terminator) to `max`.
                Err(ERANGE) if max < 1 << 20 => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Extents changed since snapshot `from` (everything allocated when
    /// `None`), within `[offset, offset+len)`.
    pub(crate) fn diff(
        &self,
        from: Option<&CStr>,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<DiffExtent>, i32> {
        let mut out: Vec<DiffExtent> = Vec::new();
        let from_ptr = from.map_or(ptr::null(), CStr::as_ptr);
        // SAFETY: open image; `from_ptr` NULL or NUL-terminated; `diff_cb`
        // has the callback's C signature and `arg` points at `out`, which
        // outlives the call and is touched only by the callback meanwhile.
        check(unsafe {
            (self.fns().rbd_diff_iterate2)(
                self.handle,
                from_ptr,
                offset,
                len,
                1,
                u8::from(whole_object),
                diff_cb,
                (&mut out as *mut Vec<DiffExtent>).cast(),
            )
        })?;
        Ok(out)
    }

    /// `None` when the key is not set.
    pub(crate) fn metadata_get(&self, key: &CStr) -> Result<Option<String>, i32> {
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            let mut have = len;
            // SAFETY: open image; NUL-terminated key; `buf` valid for
            // `have` bytes, and `have` a valid in/out pointer.
            let ret = unsafe {
                (self.fns().rbd_metadata_get)(
                    self.handle,
                    key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut have,
                )
            };
            match check(ret) {
                Ok(_) => return Ok(Some(c_string(&buf))),
                Err(ENOENT) => return Ok(None),
                Err(ERANGE) if have > len => len = have,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn metadata_set(&self, key: &CStr, value: &CStr) -> Result<(), i32> {
        // SAFETY: open image; NUL-terminated strings.
        check(unsafe { (self.fns().rbd_metadata_set)(self.handle, key.as_ptr(), value.as_ptr()) })
            .map(drop)
    }

    pub(crate) fn metadata_remove(&self, key: &CStr) -> Result<(), i32> {
        // SAFETY: open image; NUL-terminated key.
        check(unsafe { (self.fns().rbd_metadata_remove)(self.handle, key.as_ptr()) }).map(drop)
    }

    /// Addresses of the clients watching the image (this handle included).
    pub(crate) fn watchers(&self) -> Result<Vec<String>, i32> {
        let mut max = 8usize;
        loop {
            let mut ws: Vec<ImageWatcher> = (0..max)
                .map(|_| ImageWatcher {
                    addr: ptr::null_mut(),
                    id: 0,
                    cookie: 0,
                })
                .collect();
            let mut n = max;
            // SAFETY: open image; `ws` has room for `n` entries; on -ERANGE
            // librbd stores the needed count in `n` and fills nothing.
            let ret =
                unsafe { (self.fns().rbd_watchers_list)(self.handle, ws.as_mut_ptr(), &mut n) };
            match check(ret) {
                Ok(_) => {
                    let out = ws[..n]
                        .iter()
                        .map(|w| {
                            // SAFETY: librbd filled `addr` of the first `n`
                            // entries with strings it owns until cleanup.
                            unsafe { CStr::from_ptr(w.addr) }
                                .to_string_lossy()
                                .into_owned()
                        })
                        .collect();
                    // SAFETY: frees exactly the `n` entries librbd filled.
                    unsafe { (self.fns().rbd_watchers_list_cleanup)(ws.as_mut_ptr(), n) };
                    return Ok(out);
                }
                Err(ERANGE) if n > max => max = n,
                Err(e) => return Err(e),
            }
        }
    }

    /// Owners of the image's exclusive lock (empty when unlocked).
    pub(crate) fn lock_owners(&self) -> Result<Vec<String>, i32> {
        let mut max = 8usize;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); max];
            let mut n = max;
            let mut mode: c_int = 0;
            // SAFETY: open image; `owners` has room for `n` pointers; `mode`
            // and `n` valid out pointers.
            let ret = unsafe {
                (self.fns().rbd_lock_get_owners)(
                    self.handle,
                    &mut mode,
                    owners.as_mut_ptr(),
                    &mut n,
                )
            };
            match check(ret) {
                Ok(_) => {
                    let out = owners[..n]
                        .iter()
                        .map(|&p| {
                            // SAFETY: librbd filled the first `n` slots with
                            // strings it owns until the cleanup call.
                            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                        })
                        .collect();
                    // SAFETY: frees exactly the `n` strings librbd filled.
                    unsafe { (self.fns().rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
                    return Ok(out);
                }
                // No lock held: nobody owns it.
                Err(ENOENT) => return Ok(Vec::new()),
                Err(ERANGE) if n > max => max = n,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The string up to the first NUL of a buffer C filled.
fn c_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
