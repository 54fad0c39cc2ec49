//! Running as a Windows service (Windows builds only): the glue between the Service Control
//! Manager (SCM) and a body that runs until a cancellation token fires, and installing or
//! removing the service with restart on failure. It knows nothing of what the body serves:
//! `wsbridge agent` is its first user.
//!
//! - [`run`] is called by a process the SCM started (the installed command line carries the flag
//!   that says so): it registers with the SCM, reports "running", cancels the body's token on
//!   Stop or Shutdown (the body then drains as on Ctrl-C: sessions get 1001 after their data),
//!   and reports "stopped" with the body's outcome. A body that fails reports a service-specific
//!   exit code, which counts as a failure for the restart actions.
//! - [`install`] creates the service (started with Windows or by hand, as
//!   `NT AUTHORITY\LocalService`, restarted 5 s, 10 s, then every 60 s after a failure, the count
//!   reset after a day without one, a stop with an error included where the SCM supports that:
//!   Wine's does not); [`uninstall`] stops and deletes it. `sc.exe` does the same (README,
//!   "Windows"). Wine's SCM stores the restart actions but does not act on them: the restart is
//!   untested on this project's machine.
//!
//! Built on `windows-service` (Mullvad's), whose `define_windows_service!` provides the entry
//! point the SCM calls.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceFailureActions, ServiceFailureResetPeriod, ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// What a service runs: given the token that a stop request cancels, it serves until then and
/// drains; `Err` is a failure (logged, reported to the SCM, restarted by the failure actions).
pub type Body = Box<dyn FnOnce(CancellationToken) -> Result<(), Failure> + Send>;

/// Why a service's body failed: `sc query` shows `code` as its `SERVICE_EXIT_CODE` (the README
/// lists them), so a service that fails before it can log says why there too.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The service-specific exit code.
    pub code: u32,
    /// What went wrong.
    pub message: String,
}

/// Why the service could not run, be installed or be removed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Not started by the SCM (run from a console, say): the console way is to leave out the
    /// service flag.
    #[error("not started by the Service Control Manager (run without the service flag from a console)")]
    NotAService,
    /// The SCM refused (no administrator rights to install, a service of that name exists, …).
    #[error("{what}: {}", crate::logging::chain(.source))]
    Scm {
        /// What was being done.
        what: &'static str,
        /// The SCM's answer.
        #[source]
        source: windows_service::Error,
    },
    /// The body failed.
    #[error("{}", .0.message)]
    Failed(Failure),
}

impl ServiceError {
    /// The Windows error code the Service Control Manager answered, if it answered one (1073:
    /// the service exists; 1060: it does not; 5: access denied).
    pub fn os_code(&self) -> Option<i32> {
        match self {
            ServiceError::Scm {
                source: windows_service::Error::Winapi(e),
                ..
            } => e.raw_os_error(),
            _ => None,
        }
    }
}

/// How a service is installed.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The service's key name (`sc start NAME`).
    pub name: String,
    /// The name shown in the Services console.
    pub display_name: String,
    /// The description shown there.
    pub description: String,
    /// The program the SCM starts (normally `std::env::current_exe()`).
    pub executable: PathBuf,
    /// Its arguments, including the flag that makes it call [`run`].
    pub arguments: Vec<OsString>,
    /// Started with Windows (what an installed agent wants); otherwise only by `sc start`.
    pub automatic: bool,
}

/// The one service this process runs: its name and body, handed from [`run`] to the entry point
/// the SCM calls on a thread of its own (a plain `fn`, so they cannot be captured).
static SERVICE: Mutex<Option<(String, Body, Duration)>> = Mutex::new(None);
/// The body's outcome, handed back from that thread to [`run`].
static OUTCOME: Mutex<Option<Result<(), ServiceError>>> = Mutex::new(None);

define_windows_service!(ffi_service_main, service_main);

/// Runs `body` as the service `name` and returns when it has stopped. Blocks the calling thread
/// (the SCM's dispatcher runs on it); call it from `main`, outside any async runtime, and build
/// the runtime inside `body`. `stopping` is how long the body may take to stop once asked (its
/// drain): the SCM is told so, and shows the service as stopping meanwhile.
///
/// # Errors
/// [`ServiceError::NotAService`] when the process was not started by the SCM; the SCM refused;
/// or the body failed.
pub fn run(name: &str, body: Body, stopping: Duration) -> Result<(), ServiceError> {
    *SERVICE.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), body, stopping));
    if let Err(e) = service_dispatcher::start(name, ffi_service_main) {
        // ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: started from a console, not by the SCM.
        const NOT_STARTED_BY_SCM: i32 = 1063;
        return Err(match &e {
            windows_service::Error::Winapi(io) if io.raw_os_error() == Some(NOT_STARTED_BY_SCM) => ServiceError::NotAService,
            _ => ServiceError::Scm {
                what: "starting the service dispatcher",
                source: e,
            },
        });
    }
    OUTCOME.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or(Ok(()))
}

/// The SCM's call, on its own thread: run the body, keep its outcome for [`run`].
fn service_main(_arguments: Vec<OsString>) {
    let taken = SERVICE.lock().unwrap_or_else(|e| e.into_inner()).take();
    let outcome = match taken {
        Some((name, body, stopping)) => serve(&name, body, stopping),
        None => Err(ServiceError::Failed(Failure {
            code: 1,
            message: "the service was started twice".into(),
        })),
    };
    *OUTCOME.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
}

/// A service's state as the SCM is told it.
fn status(state: ServiceState, exit_code: ServiceExitCode, wait_hint: Duration) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code,
        checkpoint: 0,
        wait_hint,
        process_id: None,
    }
}

/// Registers the stop handler, reports the states, runs the body. A stop request is answered
/// with "stopping" (and `stopping` as the time it may take), so that `sc query` and a script
/// that waits for "stopped" see the drain, not a service still running.
fn serve(name: &str, body: Body, stopping: Duration) -> Result<(), ServiceError> {
    let stop = CancellationToken::new();
    let on_stop = stop.clone();
    // The handle the handler reports "stopping" through: known only once it is registered.
    let handle = std::sync::Arc::new(std::sync::OnceLock::<service_control_handler::ServiceStatusHandle>::new());
    let reporter = handle.clone();
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            if let Some(h) = reporter.get() {
                let _ = h.set_service_status(status(ServiceState::StopPending, ServiceExitCode::Win32(0), stopping));
            }
            on_stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let scm = |what| move |source| ServiceError::Scm { what, source };
    let registered = service_control_handler::register(name, handler).map_err(scm("registering the stop handler"))?;
    let _ = handle.set(registered);
    registered
        .set_service_status(status(ServiceState::Running, ServiceExitCode::Win32(0), Duration::ZERO))
        .map_err(scm("reporting running"))?;
    let outcome = body(stop);
    let code = match &outcome {
        Ok(()) => ServiceExitCode::Win32(0),
        Err(e) => {
            tracing::error!(error = %e.message, code = e.code, "service failed");
            ServiceExitCode::ServiceSpecific(e.code)
        }
    };
    registered
        .set_service_status(status(ServiceState::Stopped, code, Duration::ZERO))
        .map_err(scm("reporting stopped"))?;
    outcome.map_err(ServiceError::Failed)
}

/// Installs `spec` as a service that runs as `NT AUTHORITY\LocalService` and is restarted when
/// it fails (see the module doc). Needs administrator rights. Returns warnings for the caller to
/// show (an installer has no log): what the SCM could not set, the service installed all the same.
///
/// # Errors
/// The SCM refused (no rights, the name is taken).
pub fn install(spec: &ServiceSpec) -> Result<Vec<String>, ServiceError> {
    let scm = |what| move |source| ServiceError::Scm { what, source };
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)
        .map_err(scm("opening the Service Control Manager"))?;
    let info = ServiceInfo {
        name: spec.name.clone().into(),
        display_name: spec.display_name.clone().into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: if spec.automatic {
            ServiceStartType::AutoStart
        } else {
            ServiceStartType::OnDemand
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: spec.executable.clone(),
        launch_arguments: spec.arguments.clone(),
        dependencies: vec![],
        // Least privilege that can still dial out: no administrator rights, network access as
        // the computer.
        account_name: Some(r"NT AUTHORITY\LocalService".into()),
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .map_err(scm("creating the service"))?;
    service.set_description(&spec.description).map_err(scm("setting the description"))?;
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 60 * 60)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(10), restart(60)]),
        })
        .map_err(scm("setting restart on failure"))?;
    // A body that returns an error (exit code set, no crash) is a failure too. Wine's SCM lacks
    // this setting: a crash still restarts the service there, so it is worth a warning, not a
    // failed install.
    let mut warnings = Vec::new();
    if let Err(e) = service.set_failure_actions_on_non_crash_failures(true) {
        warnings.push(format!(
            "the service restarts when it crashes, not when it stops with an error ({})",
            crate::logging::chain(&e)
        ));
    }
    Ok(warnings)
}

/// Stops the service `name` if it runs, waits up to `wait` for it to have stopped (its drain),
/// and deletes it (the SCM removes it once every handle to it is closed, which is when this
/// returns). Returns whether it had stopped: `false` when it was still stopping at `wait`, and
/// is removed once it has. Needs administrator rights. Waiting first is what lets an upgrade
/// script copy a new program over the old one and install again right after: a service still
/// running holds its file, and one marked for deletion cannot be created again.
///
/// # Errors
/// The SCM refused (no rights, no such service).
pub fn uninstall(name: &str, wait: Duration) -> Result<bool, ServiceError> {
    let scm = |what| move |source| ServiceError::Scm { what, source };
    let manager =
        ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT).map_err(scm("opening the Service Control Manager"))?;
    let service = manager
        .open_service(name, ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE)
        .map_err(scm("opening the service"))?;
    let state = || service.query_status().map(|s| s.current_state).map_err(scm("querying the service"));
    // Running, or still starting (a stop is refused until it reports running: asked again
    // below, while waiting).
    let mut asked = false;
    if !matches!(state()?, ServiceState::Stopped | ServiceState::StopPending) {
        asked = service.stop().is_ok();
    }
    let until = std::time::Instant::now() + wait;
    let mut stopped = state()? == ServiceState::Stopped;
    while !stopped && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
        let now = state()?;
        if !asked && now == ServiceState::Running {
            asked = service.stop().is_ok();
        }
        stopped = now == ServiceState::Stopped;
    }
    service.delete().map_err(scm("deleting the service"))?;
    Ok(stopped)
}
