//! Windows named pipes (`\\.\pipe\NAME`). Compiled only on Windows.
//!
//! Every instance of the broker's pipe is owned by the user who runs the broker and carries a
//! DACL for that user and the system only ([`owner_only`]), refuses remote clients, and each
//! accepted client is identified by its process id (`GetNamedPipeClientProcessId`, from the
//! kernel) and that process's executable. A client checks, before it sends anything, that the
//! pipe it opened is owned by its own user or the system: a pipe another user made first under
//! the broker's name is refused. The system calls are the transport's only `unsafe` code,
//! each with its SAFETY comment.

use crate::error::TransportError;
use crate::{Connection, PeerInfo, TransportKind};
use std::os::windows::io::AsRawHandle;
use std::time::Duration;
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};

/// Windows error code for "all pipe instances are busy".
const ERROR_PIPE_BUSY: i32 = 231;

/// The pipe's security descriptor, in SDDL, for the user whose SID is `sid`: owned by that
/// user, a protected DACL granting all access to that user and to the system (`SY`), and to
/// nobody else.
#[must_use]
pub fn owner_only(sid: &str) -> String {
    format!("O:{sid}D:P(A;;GA;;;{sid})(A;;GA;;;SY)")
}

/// The SID of the user this process runs as.
#[allow(unsafe_code)]
fn own_sid() -> std::io::Result<Sid> {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::Security::{
        GetLengthSid, GetTokenInformation, TOKEN_QUERY, TOKEN_USER, TokenUser,
    };
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};
    let mut token = std::ptr::null_mut();
    // SAFETY: the pseudo-handle of this process; `token` is a valid place for the handle.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // TOKEN_USER and its SID fit in far less; u64s keep the buffer aligned for the struct.
    let mut buf = vec![0u64; 128];
    let mut len = 0u32;
    let size = u32::try_from(buf.len() * 8).unwrap_or(u32::MAX);
    // SAFETY: `token` was opened above with TOKEN_QUERY; `buf` has `size` writable bytes.
    let ok =
        unsafe { GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), size, &mut len) };
    let err = std::io::Error::last_os_error();
    // SAFETY: opened above, closed once.
    unsafe {
        CloseHandle(token);
    }
    if ok == 0 {
        return Err(err);
    }
    // SAFETY: the call filled `buf` with a TOKEN_USER, whose SID points into `buf`; its length
    // is read from the SID itself, and the bytes are copied out while `buf` lives.
    let bytes = unsafe {
        let user = &*buf.as_ptr().cast::<TOKEN_USER>();
        let sid = user.User.Sid;
        let n = GetLengthSid(sid) as usize;
        std::slice::from_raw_parts(sid.cast::<u8>(), n).to_vec()
    };
    Ok(Sid(bytes))
}

/// A SID, copied into memory of our own.
struct Sid(Vec<u8>);

impl Sid {
    fn as_psid(&self) -> windows_sys::Win32::Security::PSID {
        self.0.as_ptr().cast_mut().cast()
    }

    /// Its string form (`S-1-5-21-…`).
    #[allow(unsafe_code)]
    fn to_sddl(&self) -> std::io::Result<String> {
        use windows_sys::Win32::Foundation::LocalFree;
        use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
        let mut text = std::ptr::null_mut();
        // SAFETY: `self` holds a whole SID (copied with its length); `text` receives a
        // LocalAlloc'd NUL-terminated string, read and freed below.
        if unsafe { ConvertSidToStringSidW(self.as_psid(), &mut text) } == 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: NUL-terminated by the call's contract; freed once, not used after.
        let s = unsafe { wide_to_string(text) };
        unsafe {
            LocalFree(text.cast());
        }
        Ok(s)
    }
}

/// A NUL-terminated UTF-16 string.
///
/// # Safety
///
/// `p` points to a NUL-terminated UTF-16 string.
#[allow(unsafe_code)]
unsafe fn wide_to_string(p: *const u16) -> String {
    let mut n = 0;
    // SAFETY: the caller's promise: every unit up to the NUL is readable.
    while unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    // SAFETY: the `n` units were just read.
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Whether the pipe `handle` is owned by `user` or by the system.
#[allow(unsafe_code)]
fn owned_by(handle: std::os::windows::io::RawHandle, user: &Sid) -> std::io::Result<bool> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{GetSecurityInfo, SE_KERNEL_OBJECT};
    use windows_sys::Win32::Security::{
        EqualSid, IsWellKnownSid, OWNER_SECURITY_INFORMATION, WinLocalSystemSid,
    };
    let mut owner = std::ptr::null_mut();
    let mut descriptor = std::ptr::null_mut();
    // SAFETY: a live handle opened for reading (which includes READ_CONTROL); the owner
    // pointer points into `descriptor`, freed below after its last use.
    let err = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            OWNER_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut descriptor,
        )
    };
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(
            i32::try_from(err).unwrap_or(i32::MAX),
        ));
    }
    // SAFETY: `owner` is a SID inside `descriptor`, alive until the LocalFree below.
    let ours = unsafe {
        EqualSid(owner, user.as_psid()) != 0 || IsWellKnownSid(owner, WinLocalSystemSid) != 0
    };
    // SAFETY: allocated by GetSecurityInfo, freed once.
    unsafe {
        LocalFree(descriptor);
    }
    Ok(ours)
}

fn full_name(name: &str) -> String {
    format!(r"\\.\pipe\{name}")
}

/// Accepts pipe clients, keeping one server instance ready at all times.
pub(crate) struct PipeListener {
    name: String,
    next: NamedPipeServer,
}

impl PipeListener {
    pub(crate) fn bind(name: &str) -> Result<Self, TransportError> {
        let name = full_name(name);
        // `first_pipe_instance` refuses to start when another broker owns the name.
        let next = create(&name, true)
            .map_err(|e| TransportError::io(format!("creating pipe {name}"), e))?;
        Ok(Self { name, next })
    }

    pub(crate) async fn accept(&mut self) -> std::io::Result<Connection> {
        self.next.connect().await?;
        let fresh = create(&self.name, false)?;
        let connected = std::mem::replace(&mut self.next, fresh);
        let pid = client_pid(&connected);
        let peer = PeerInfo {
            pid: pid.and_then(|p| i32::try_from(p).ok()),
            exe: pid.and_then(executable_of),
            transport: TransportKind::NamedPipe,
            ..PeerInfo::default()
        };
        Ok(crate::split_stream(connected, peer))
    }
}

/// One instance of the pipe `name`, with the owner-only security descriptor.
#[allow(unsafe_code)]
fn create(name: &str, first: bool) -> std::io::Result<NamedPipeServer> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;
    let sddl = owner_only(&own_sid()?.to_sddl()?);
    let sddl: Vec<u16> = sddl.encode_utf16().chain(Some(0)).collect();
    let mut descriptor = std::ptr::null_mut();
    // SAFETY: `sddl` is a NUL-terminated UTF-16 string that lives across the call, and
    // `descriptor` is a valid place for the pointer the call allocates (freed below with
    // LocalFree, as the function's contract says); the size is not asked for (null).
    let converted = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut descriptor,
            std::ptr::null_mut(),
        )
    };
    if converted == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut attributes = SECURITY_ATTRIBUTES {
        nLength: u32::try_from(std::mem::size_of::<SECURITY_ATTRIBUTES>()).unwrap_or(u32::MAX),
        lpSecurityDescriptor: descriptor,
        bInheritHandle: 0,
    };
    let mut options = ServerOptions::new();
    options
        .first_pipe_instance(first)
        .reject_remote_clients(true);
    // SAFETY: `attributes` is a valid SECURITY_ATTRIBUTES whose descriptor was made above
    // and is alive until after the call; CreateNamedPipeW reads them and keeps no pointer.
    let created = unsafe {
        options
            .create_with_security_attributes_raw(name, std::ptr::from_mut(&mut attributes).cast())
    };
    // SAFETY: `descriptor` was allocated by the conversion above and is not used again.
    unsafe {
        LocalFree(descriptor);
    }
    created
}

/// The connected client's process id, as the kernel knows it.
#[allow(unsafe_code)]
fn client_pid(server: &NamedPipeServer) -> Option<u32> {
    use windows_sys::Win32::System::Pipes::GetNamedPipeClientProcessId;
    let mut pid = 0u32;
    // SAFETY: the handle is the live, connected pipe instance `server` owns, and `pid` is a
    // valid place for the answer.
    let ok = unsafe { GetNamedPipeClientProcessId(server.as_raw_handle(), &mut pid) };
    (ok != 0 && pid != 0).then_some(pid)
}

/// The executable of process `pid`, if it can be read.
#[allow(unsafe_code)]
fn executable_of(pid: u32) -> Option<std::path::PathBuf> {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{
        OpenProcess, PROCESS_NAME_WIN32, PROCESS_QUERY_LIMITED_INFORMATION,
        QueryFullProcessImageNameW,
    };
    // SAFETY: plain call; a null handle is checked below.
    let process = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if process.is_null() {
        return None;
    }
    let mut buf = vec![0u16; 32 * 1024];
    let mut len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    // SAFETY: `process` is the handle opened above; `buf` has room for `len` UTF-16 units,
    // and `len` is a valid place for the length written.
    let ok = unsafe {
        QueryFullProcessImageNameW(process, PROCESS_NAME_WIN32, buf.as_mut_ptr(), &mut len)
    };
    // SAFETY: the handle was opened above and is closed once.
    unsafe {
        CloseHandle(process);
    }
    if ok == 0 {
        return None;
    }
    buf.truncate(usize::try_from(len).ok()?);
    Some(std::path::PathBuf::from(String::from_utf16_lossy(&buf)))
}

pub(crate) async fn connect(name: &str) -> Result<Connection, TransportError> {
    let name = full_name(name);
    let mut attempts = 0;
    let client = loop {
        match ClientOptions::new().open(&name) {
            Ok(c) => break c,
            // Bounded: 50 × 20 ms while every instance is busy.
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(TransportError::io(format!("connecting to pipe {name}"), e)),
        }
    };
    // Before anything is sent: the broker's pipe is its user's (or the system's). Another
    // user's process may have made this name first.
    let user = own_sid().map_err(|e| TransportError::io("reading this process's user", e))?;
    match owned_by(client.as_raw_handle(), &user) {
        Ok(true) => {}
        Ok(false) => {
            return Err(TransportError::io(
                format!("connecting to pipe {name}"),
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the pipe is owned by another user, not this user's broker: refused",
                ),
            ));
        }
        Err(e) => {
            return Err(TransportError::io(
                format!("reading the owner of pipe {name}"),
                e,
            ));
        }
    }
    Ok(crate::split_stream(
        client,
        PeerInfo {
            transport: TransportKind::NamedPipe,
            ..PeerInfo::default()
        },
    ))
}

/// The security descriptor a pipe handle carries, in SDDL (its DACL), for tests.
#[cfg(test)]
#[allow(unsafe_code)]
fn dacl_of(handle: std::os::windows::io::RawHandle) -> Option<String> {
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, GetSecurityInfo, SDDL_REVISION_1,
        SE_KERNEL_OBJECT,
    };
    use windows_sys::Win32::Security::DACL_SECURITY_INFORMATION;
    let mut descriptor = std::ptr::null_mut();
    // SAFETY: a live handle; the out pointers we do not want are null, the descriptor is
    // freed with LocalFree below.
    let err = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut descriptor,
        )
    };
    if err != 0 {
        return None;
    }
    let mut text = std::ptr::null_mut();
    // SAFETY: `descriptor` is the one returned above; `text` receives a LocalAlloc'd,
    // NUL-terminated string, read and freed below.
    let ok = unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            descriptor,
            SDDL_REVISION_1,
            DACL_SECURITY_INFORMATION,
            &mut text,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: on success `text` is NUL-terminated (the call's contract).
    let sddl = (ok != 0).then(|| unsafe { wide_to_string(text) });
    // SAFETY: both were allocated by the calls above and are not used again.
    unsafe {
        LocalFree(text.cast());
        LocalFree(descriptor);
    }
    sddl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pipe_is_owner_only_and_knows_its_client_process() {
        let name = format!("eb-pipe-test-{}", std::process::id());
        let mut listener = PipeListener::bind(&name).unwrap();
        let dacl = dacl_of(listener.next.as_raw_handle()).expect("the pipe's DACL reads back");
        let sid = own_sid().unwrap().to_sddl().unwrap();
        assert!(
            dacl.contains(&format!("(A;;GA;;;{sid})")),
            "its user, {sid}: {dacl}"
        );
        assert!(dacl.starts_with("D:P"), "a protected DACL: {dacl}");
        assert!(!dacl.contains(";;;WD)"), "nothing for Everyone: {dacl}");
        assert!(!dacl.contains(";;;AN)"), "nothing for anonymous: {dacl}");
        let (accepted, client) = tokio::join!(listener.accept(), connect(&name));
        let (accepted, _client) = (accepted.unwrap(), client.unwrap());
        assert_eq!(accepted.peer.pid, i32::try_from(std::process::id()).ok());
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            accepted.peer.exe.as_ref().and_then(|e| e.file_name()),
            exe.file_name(),
            "the client's executable"
        );
    }

    #[tokio::test]
    async fn a_pipe_of_another_user_is_told_apart_from_ours() {
        let name = format!("eb-pipe-owner-{}", std::process::id());
        let listener = PipeListener::bind(&name).unwrap();
        let handle = listener.next.as_raw_handle();
        assert!(owned_by(handle, &own_sid().unwrap()).unwrap(), "ours");
        // Everyone (S-1-1-0) is not the owner: a client running as another user is refused.
        let everyone = Sid(vec![1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(everyone.to_sddl().unwrap(), "S-1-1-0");
        assert!(!owned_by(handle, &everyone).unwrap());
    }

    /// Windows refuses a second first instance of a name; Wine 8 does not (it ignores
    /// `FILE_FLAG_FIRST_PIPE_INSTANCE`), so this runs on Windows only (`--ignored`).
    #[tokio::test]
    #[ignore = "Wine 8 does not enforce FILE_FLAG_FIRST_PIPE_INSTANCE: run on Windows with --ignored"]
    async fn a_second_broker_cannot_take_the_name() {
        let name = format!("eb-pipe-first-{}", std::process::id());
        let _first = PipeListener::bind(&name).unwrap();
        assert!(PipeListener::bind(&name).is_err());
    }
}
