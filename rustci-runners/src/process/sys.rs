//! Raw Linux system calls for code that runs in a child sharing the parent's memory.
//!
//! The job shim and the step's process start with `clone(CLONE_VM)`, so they share the
//! address space (and the thread-local storage of the thread that created them) with the
//! runner. They therefore must not call anything that writes to memory the runner uses:
//! no allocation, no libc wrapper that sets `errno`, no glibc `setuid` (which signals the
//! runner's threads). Everything they do goes through these wrappers, which return the
//! kernel's result (`-errno` on failure) and touch nothing else.

use std::ffi::c_long;

/// Calls system call `nr` with up to six arguments; returns the raw result.
///
/// # Safety
/// The arguments must be valid for the call.
#[inline(always)]
pub(crate) unsafe fn syscall6(nr: c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller guarantees the arguments; the asm follows the kernel ABI.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("rustci-runners' process supervisor supports x86_64 and aarch64 Linux");

macro_rules! sys {
    ($nr:expr) => { syscall6($nr as c_long, [0; 6]) };
    ($nr:expr, $($arg:expr),+) => {{
        let mut a = [0usize; 6];
        let mut i = 0;
        $( a[i] = $arg as usize; i += 1; )+
        let _ = i;
        syscall6($nr as c_long, a)
    }};
}
pub(crate) use sys;

/// Starts `entry(arg)` in a child process on `stack_top` with clone `flags` (which must
/// include the exit signal, normally `SIGCHLD`). Returns the child's pid, or `-errno`.
/// The child exits with `entry`'s return value.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned top of a stack that stays mapped until the
/// child has exited or exec'd; `entry` must only use this module's raw calls.
pub(crate) unsafe fn clone_with_stack(
    flags: usize,
    stack_top: *mut u8,
    entry: unsafe extern "C" fn(usize) -> isize,
    arg: usize,
) -> isize {
    let ret: isize;
    // SAFETY: the child runs `entry` on its own stack and exits without returning here.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            // Child: new stack, call entry(arg), then exit with its result.
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov rdi, rax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone as isize => ret,
            in("rdi") flags,
            in("rsi") stack_top,
            in("rdx") 0usize,
            in("r10") 0usize,
            in("r8") 0usize,
            in("r12") arg,
            in("r13") entry as usize,
            lateout("rcx") _, lateout("r11") _,
        );
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x9",
            "blr x10",
            "mov x8, 93",
            "svc 0",
            "brk 0",
            "2:",
            in("x8") libc::SYS_clone,
            inlateout("x0") flags as isize => ret,
            in("x1") stack_top,
            in("x2") 0usize,
            in("x3") 0usize,
            in("x4") 0usize,
            in("x9") arg,
            in("x10") entry as usize,
        );
    }
    ret
}

/// A stack for a cloned child: an anonymous mapping with a guard page below it.
pub(crate) struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for Stack {}
unsafe impl Sync for Stack {}

/// Stacks kept for reuse, so that starting a step costs no mapping calls.
static POOL: std::sync::Mutex<Vec<Stack>> = std::sync::Mutex::new(Vec::new());
const POOL_MAX: usize = 32;

impl Stack {
    /// A stack of `len` bytes from the pool, or a new mapping.
    pub(crate) fn take(len: usize) -> std::io::Result<Stack> {
        let reused = POOL.lock().ok().and_then(|mut pool| {
            pool.iter()
                .position(|s| s.len == len + 4096)
                .map(|i| pool.swap_remove(i))
        });
        match reused {
            Some(stack) => Ok(stack),
            None => Stack::new(len),
        }
    }

    /// Returns the stack to the pool (or unmaps it when the pool is full). Only for a
    /// stack no child runs on any more.
    pub(crate) fn give_back(self) {
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(self);
        }
    }

    /// Maps a stack of `len` bytes (plus a guard page).
    pub(crate) fn new(len: usize) -> std::io::Result<Stack> {
        let page = 4096;
        let total = len + page;
        // SAFETY: anonymous private mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the first page of our own mapping.
        unsafe { libc::mprotect(base, page, libc::PROT_NONE) };
        Ok(Stack { base, len: total })
    }

    /// The 16-byte aligned top of the stack.
    pub(crate) fn top(&self) -> *mut u8 {
        // SAFETY: one past the end of our mapping, aligned down to 16.
        let end = unsafe { (self.base as *mut u8).add(self.len) };
        ((end as usize) & !15) as *mut u8
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
