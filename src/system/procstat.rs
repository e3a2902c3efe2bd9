//! Process resource readings from Linux `/proc` (benchmarks and run metrics). On other systems, or
//! when `/proc` is unreadable, the readings are `None`.

/// Peak resident set size (VmHWM) in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Current resident set size (VmRSS) in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Address space in use (VmSize) in bytes: what `RLIMIT_AS` counts.
pub fn virtual_bytes() -> Option<u64> {
    status_kib("VmSize:").map(|kib| kib * 1024)
}

/// User + system CPU time of the whole process (all threads), in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every mainstream Linux ABI.
    Some((utime + stime) / 100.0)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bytes for people: `1.53 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.2} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn readings_are_plausible() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(peak_rss_bytes().unwrap() >= rss);
        let before = cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_seconds().unwrap() >= before);
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human(3 << 30), "3.00 GiB");
        assert_eq!(human(512), "512 B");
    }
}
