//! WinHTTP's proxy settings, read through Microsoft's raw bindings (`windows-sys`): the crate's
//! only `unsafe` on Windows (on Linux, `platform::SendQueue`'s one ioctl). Three calls, each turned into owned Rust values at once:
//!
//! - [`user_settings`]: `WinHttpGetIEProxyConfigForCurrentUser`, the Internet Options of the
//!   user this process runs as;
//! - [`default_setting`]: `WinHttpGetDefaultProxyConfiguration`, the machine's WinHTTP default
//!   (`netsh winhttp set proxy`);
//! - [`proxy_for_url`]: `WinHttpGetProxyForUrl` on a session of its own, for a PAC script or WPAD.
//!   It can wait on the network (DHCP, DNS, the script's download): the caller runs it on a
//!   thread of its own and stops waiting at its deadline ([`super::system_proxy`]). The
//!   session's timeouts bound its requests, not necessarily the whole lookup (WPAD's discovery,
//!   the script's run; Wine downloads the script on a session of its own), so the thread may
//!   outlive the deadline.
//!
//! Every string WinHTTP hands over was allocated with `GlobalAlloc` and is the caller's to free
//! with `GlobalFree`: each one is wrapped in a [`GlobalString`] the moment the call returns, which
//! copies it out and frees it exactly once, also on the early returns. Handles are closed by
//! [`Session`]'s `Drop`. Errors are WinHTTP's codes (`GetLastError`, read right after the call),
//! put into words by [`super::system_proxy::winhttp_error`].
#![allow(unsafe_code)]
// Every `unsafe` block says why it is sound; clippy holds us to that.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::time::Duration;

use windows_sys::Win32::Foundation::{GetLastError, GlobalFree, ERROR_FILE_NOT_FOUND};
use windows_sys::Win32::Networking::WinHttp::{
    WinHttpCloseHandle, WinHttpGetDefaultProxyConfiguration, WinHttpGetIEProxyConfigForCurrentUser, WinHttpGetProxyForUrl, WinHttpOpen,
    WinHttpSetTimeouts, WINHTTP_ACCESS_TYPE_NAMED_PROXY, WINHTTP_ACCESS_TYPE_NO_PROXY, WINHTTP_AUTOPROXY_AUTO_DETECT,
    WINHTTP_AUTOPROXY_CONFIG_URL, WINHTTP_AUTOPROXY_OPTIONS, WINHTTP_AUTO_DETECT_TYPE_DHCP, WINHTTP_AUTO_DETECT_TYPE_DNS_A,
    WINHTTP_CURRENT_USER_IE_PROXY_CONFIG, WINHTTP_PROXY_INFO,
};

use super::system_proxy::{StaticSetting, UserSettings};

/// A string WinHTTP allocated for us (or null): freed with `GlobalFree` when dropped.
struct GlobalString(*mut u16);

impl GlobalString {
    /// Its text (`None` for null or empty), copied out; the allocation is freed when `self` drops.
    fn text(&self) -> Option<String> {
        if self.0.is_null() {
            return None;
        }
        // SAFETY: `self.0` is non-null and was handed over by a successful WinHTTP call as a
        // NUL-terminated UTF-16 string that stays allocated until we free it in `drop` (we hold
        // the only owner, and `&self` keeps it alive through this function). So every element up
        // to and including the terminating NUL is readable, `len` stops at that NUL, and the slice
        // of `len` elements lies within the allocation; nothing writes to it meanwhile.
        let units = unsafe {
            let mut len = 0;
            while *self.0.add(len) != 0 {
                len += 1;
            }
            std::slice::from_raw_parts(self.0, len)
        };
        let text = String::from_utf16_lossy(units);
        (!text.trim().is_empty()).then_some(text)
    }
}

impl Drop for GlobalString {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: WinHTTP allocated this string with `GlobalAlloc` and passed its ownership to
            // us (its documentation: the caller frees it with `GlobalFree`); each `GlobalString`
            // is made once per returned pointer and is not `Clone`, so it is freed exactly once,
            // and `text` borrows never outlive `self`.
            unsafe { GlobalFree(self.0.cast()) };
        }
    }
}

/// A WinHTTP session handle, closed when dropped.
struct Session(*mut core::ffi::c_void);

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a non-null handle `WinHttpOpen` returned (a `Session` is only made
        // from one), not closed anywhere else; no call using it outlives `self`.
        unsafe { WinHttpCloseHandle(self.0) };
    }
}

/// `s` as a NUL-terminated UTF-16 string (for the calls' `PCWSTR` parameters).
fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// The last error of this thread, right after a call failed.
fn last_error() -> u32 {
    // SAFETY: no arguments, no pointers; it reads this thread's last-error value.
    unsafe { GetLastError() }
}

/// The Internet Options of the user this process runs as (all unset when the user has none, as
/// a service's account often has).
///
/// # Errors
/// WinHTTP's error code.
pub fn user_settings() -> Result<UserSettings, u32> {
    let mut config = WINHTTP_CURRENT_USER_IE_PROXY_CONFIG::default();
    // SAFETY: `config` is a properly aligned, zeroed (null pointers) struct of the type the
    // function fills, valid for writes for the whole call.
    let ok = unsafe { WinHttpGetIEProxyConfigForCurrentUser(&mut config) };
    if ok == 0 {
        // On failure we free nothing: no string is documented as handed over then, and a leak
        // at worst is better than freeing what is not ours.
        return match last_error() {
            // "No Internet Explorer proxy settings can be found": none set.
            ERROR_FILE_NOT_FOUND => Ok(UserSettings::default()),
            code => Err(code),
        };
    }
    // Each pointer is null or a GlobalAlloc'd string now ours, wrapped once and freed on drop.
    let pac = GlobalString(config.lpszAutoConfigUrl);
    let proxy = GlobalString(config.lpszProxy);
    let bypass = GlobalString(config.lpszProxyBypass);
    Ok(UserSettings {
        auto_detect: config.fAutoDetect != 0,
        pac_url: pac.text(),
        proxy: proxy.text(),
        bypass: bypass.text(),
    })
}

/// The machine's WinHTTP default proxy (`None`: direct).
///
/// # Errors
/// WinHTTP's error code.
pub fn default_setting() -> Result<Option<StaticSetting>, u32> {
    let mut info = WINHTTP_PROXY_INFO::default();
    // SAFETY: `info` is a properly aligned, zeroed struct of the type the function fills, valid
    // for writes for the whole call.
    let ok = unsafe { WinHttpGetDefaultProxyConfiguration(&mut info) };
    if ok == 0 {
        return Err(last_error());
    }
    let (proxy, bypass) = (GlobalString(info.lpszProxy), GlobalString(info.lpszProxyBypass));
    Ok(match (info.dwAccessType, proxy.text()) {
        (WINHTTP_ACCESS_TYPE_NAMED_PROXY, Some(proxy)) => Some(StaticSetting {
            proxy,
            bypass: bypass.text(),
        }),
        _ => None,
    })
}

/// The proxy list WinHTTP gives for `url` from the PAC script at `pac_url` and/or the one
/// automatic detection (WPAD: DHCP, then DNS) finds, logging on to fetch it if asked
/// (`fAutoLogonIfChallenged`); `None` when the script says DIRECT. The session's requests get
/// `timeout` (WinHTTP's own steps, and Wine's script download, may take longer).
///
/// # Errors
/// WinHTTP's error code (no script found, not downloaded, failed, …).
pub fn proxy_for_url(url: &str, auto_detect: bool, pac_url: Option<&str>, timeout: Duration) -> Result<Option<String>, u32> {
    let agent = wide(concat!("wsbridge-agent/", env!("CARGO_PKG_VERSION")));
    // SAFETY: `agent` is a NUL-terminated UTF-16 string alive for the call (WinHTTP copies it);
    // with WINHTTP_ACCESS_TYPE_NO_PROXY the proxy and bypass parameters may be null, and flags 0
    // asks for a synchronous session.
    let handle = unsafe { WinHttpOpen(agent.as_ptr(), WINHTTP_ACCESS_TYPE_NO_PROXY, std::ptr::null(), std::ptr::null(), 0) };
    if handle.is_null() {
        return Err(last_error());
    }
    let session = Session(handle);
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: `session.0` is a live session handle (closed only when `session` drops, after this).
    // A failure leaves WinHTTP's default timeouts: not worth failing for.
    let _ = unsafe { WinHttpSetTimeouts(session.0, ms, ms, ms, ms) };
    let url = wide(url);
    let pac = pac_url.map(wide);
    let mut flags = 0;
    if auto_detect {
        flags |= WINHTTP_AUTOPROXY_AUTO_DETECT;
    }
    if pac.is_some() {
        flags |= WINHTTP_AUTOPROXY_CONFIG_URL;
    }
    let mut options = WINHTTP_AUTOPROXY_OPTIONS {
        dwFlags: flags,
        dwAutoDetectFlags: if auto_detect {
            WINHTTP_AUTO_DETECT_TYPE_DHCP | WINHTTP_AUTO_DETECT_TYPE_DNS_A
        } else {
            0
        },
        lpszAutoConfigUrl: pac.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
        lpvReserved: std::ptr::null_mut(),
        dwReserved: 0,
        fAutoLogonIfChallenged: 1,
    };
    let mut info = WINHTTP_PROXY_INFO::default();
    // SAFETY: `session.0` is a live session handle; `url` and (when set) `pac`, which
    // `options.lpszAutoConfigUrl` points into, are NUL-terminated UTF-16 strings that outlive the
    // call (they are locals dropped after it); `options` and `info` are properly aligned structs
    // of the right types, valid for reads and writes for the whole call; reserved fields are
    // null/0 as documented.
    let ok = unsafe { WinHttpGetProxyForUrl(session.0, url.as_ptr(), &mut options, &mut info) };
    if ok == 0 {
        return Err(last_error());
    }
    // Both strings are ours now (null or GlobalAlloc'd): freed when these drop.
    let (proxy, _bypass) = (GlobalString(info.lpszProxy), GlobalString(info.lpszProxyBypass));
    Ok(match info.dwAccessType {
        WINHTTP_ACCESS_TYPE_NAMED_PROXY => proxy.text(),
        _ => None,
    })
}
