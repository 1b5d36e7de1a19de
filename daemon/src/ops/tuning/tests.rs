//! Tests of the tuning check against fake proc trees.

use super::profiles::{dotted_key, explicit_rules};
use super::report::group;
use super::*;
use std::fs;
use std::path::Path;

const KERNEL: u64 = DEFAULT_PER_CONN_KERNEL_BYTES;
const USER: u64 = DEFAULT_PER_CONN_USER_BYTES;

fn limits_text(nofile: &str, memlock: &str) -> String {
    format!(
        "Limit                     Soft Limit           Hard Limit           Units     \n\
         Max cpu time              unlimited            unlimited            seconds   \n\
         Max open files            {nofile:<20} {nofile:<20} files     \n\
         Max locked memory         {memlock:<20} {memlock:<20} bytes     \n\
         Max address space         unlimited            unlimited            bytes     \n"
    )
}

/// A fake proc tree where every key of `profile` has exactly the profile
/// value, limits fit the profile, 256 GiB RAM and 16 CPUs.
fn good_tree(profile: Profile) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in profile.entries().unwrap() {
        // Live files are tab-separated, like the kernel's.
        write(&e.path_under(dir.path()), &e.value.replace(' ', "\t"));
    }
    let nofile = (profile.agents() * 2).to_string();
    write(
        &dir.path().join("self/limits"),
        &limits_text(&nofile, "67108864"),
    );
    write(
        &dir.path().join("meminfo"),
        &format!("MemTotal:       {} kB\nMemFree:  1 kB\n", 256u64 << 20),
    );
    let cpuinfo: String = (0..16)
        .map(|i| format!("processor\t: {i}\nmodel name\t: test\n\n"))
        .collect();
    write(&dir.path().join("cpuinfo"), &cpuinfo);
    dir
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, format!("{text}\n")).unwrap();
}

fn input(root: &Path, profile: Profile) -> CheckInput {
    CheckInput {
        proc_root: root.to_path_buf(),
        ..CheckInput::new(profile)
    }
}

fn finding<'a>(r: &'a Report, key: &str) -> &'a SysctlFinding {
    r.sysctls.iter().find(|f| f.key == key).unwrap()
}

#[test]
fn profiles_parse_and_every_key_has_an_explicit_rule() {
    for p in Profile::ALL {
        let entries = p.entries().unwrap();
        assert!(entries.len() >= 10, "{p}: {entries:?}");
        for e in &entries {
            assert!(
                explicit_rules(&e.key).is_some(),
                "{p}: no rule for {}",
                e.key
            );
        }
        let conntrack = entries
            .iter()
            .find(|e| e.key == "net.netfilter.nf_conntrack_max")
            .unwrap();
        assert!(conntrack.optional);
        assert_eq!(p.name().parse::<Profile>().unwrap(), p);
    }
    assert!("1M".parse::<Profile>().is_ok());
    assert!(matches!(
        "2m".parse::<Profile>(),
        Err(TuningError::UnknownProfile(_))
    ));
}

#[test]
fn profile_tcp_mem_is_sized_for_its_agents() {
    for p in Profile::ALL {
        let e = p.entries().unwrap();
        let tcp_mem = &e
            .iter()
            .find(|e| e.key == "net.ipv4.tcp_mem")
            .unwrap()
            .value;
        let max: u64 = tcp_mem.split(' ').nth(2).unwrap().parse().unwrap();
        // At least one 4 KiB page per agent in the hard limit.
        assert!(max * PAGE_SIZE >= p.agents() * KERNEL, "{p}: {tcp_mem}");
        let nr_open = &e.iter().find(|e| e.key == "fs.nr_open").unwrap().value;
        assert!(nr_open.parse::<u64>().unwrap() >= p.agents() + NOFILE_RESERVE);
    }
}

#[test]
fn sysctl_conf_syntax() {
    let text = "# c\n; c\n\n  net.core.somaxconn =  4096 \n-net/netfilter/nf_conntrack_max=5\n\
                net.ipv4.tcp_mem = 1   2\t3\nnet.core.somaxconn = 8192\n";
    let e = parse_sysctl_conf(text).unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0].key, "net.netfilter.nf_conntrack_max");
    assert!(e[0].optional);
    assert_eq!(e[1].value, "1 2 3");
    assert_eq!(e[2].value, "8192");
    assert_eq!(e[2].line, 7);
    assert_eq!(
        e[0].path_under(Path::new("/p")),
        PathBuf::from("/p/sys/net/netfilter/nf_conntrack_max")
    );
    assert_eq!(
        dotted_key("net/ipv4/conf/eth0.100/rp_filter"),
        "net.ipv4.conf.eth0/100.rp_filter"
    );
    assert_eq!(parse_sysctl_conf("junk\n").unwrap_err().line, 1);
    assert!(parse_sysctl_conf("a.b =\n").is_err());
    assert!(parse_sysctl_conf("net.*.x = 1\n").is_err());
}

#[test]
fn all_good_tree_has_no_problems() {
    for p in Profile::ALL {
        let dir = good_tree(p);
        let r = check(&input(dir.path(), p)).unwrap();
        assert_eq!(r.problems(), 0, "{p}:\n{r}");
        assert_eq!(r.cores, 16);
        assert!(r.to_string().ends_with("all OK"), "{r}");
    }
}

#[test]
fn low_nr_open_is_reported() {
    let dir = good_tree(Profile::Agents1m);
    write(&dir.path().join("sys/fs/nr_open"), "1048576");
    let r = check(&input(dir.path(), Profile::Agents1m)).unwrap();
    assert_eq!(r.problems(), 1, "{r}");
    let f = finding(&r, "fs.nr_open");
    assert_eq!(f.status, Status::Low);
    assert_eq!(f.live.as_deref(), Some("1048576"));
    let out = r.to_string();
    assert!(out.contains("fs.nr_open") && out.contains("LOW"), "{out}");
    assert!(out.ends_with("1 problem"), "{out}");
}

#[test]
fn higher_limits_and_lower_caps_are_fine_other_directions_are_not() {
    let p = Profile::Agents1m;
    let dir = good_tree(p);
    let root = dir.path();
    // More than wanted for an "at least" key, less for an "at most" key,
    // and a different (unchecked) buffer max: all fine.
    write(&root.join("sys/fs/nr_open"), "1073741816");
    write(&root.join("sys/net/ipv4/tcp_fin_timeout"), "5");
    write(&root.join("sys/net/ipv4/tcp_wmem"), "4096\t8192\t33554432");
    write(
        &root.join("sys/net/ipv4/ip_local_port_range"),
        "1024\t65535",
    );
    let r = check(&input(root, p)).unwrap();
    assert_eq!(r.problems(), 0, "{r}");
    assert_eq!(
        finding(&r, "net.ipv4.ip_local_port_range").status,
        Status::Info
    );

    // Kernel defaults: 131072 rmem default is above the profile's cap,
    // tcp_mem is far below, tcp_migrate_req is off.
    write(&root.join("sys/net/ipv4/tcp_rmem"), "4096\t131072\t6291456");
    write(&root.join("sys/net/ipv4/tcp_mem"), "287901\t383868\t575802");
    write(&root.join("sys/net/ipv4/tcp_migrate_req"), "0");
    let r = check(&input(root, p)).unwrap();
    let rmem = finding(&r, "net.ipv4.tcp_rmem");
    assert_eq!(rmem.status, Status::High);
    assert_eq!(rmem.detail, "high: default");
    let tcp_mem = finding(&r, "net.ipv4.tcp_mem");
    assert_eq!(tcp_mem.status, Status::Low);
    assert_eq!(tcp_mem.detail, "low: min, pressure, max");
    assert_eq!(finding(&r, "net.ipv4.tcp_migrate_req").status, Status::Low);
    // 575802 pages x 4096 / 4096 B = 575802 < 1M: capacity is short too.
    assert_eq!(r.capacity.by_tcp_mem, Some(575_802));
    assert!(r.capacity_short());
    assert_eq!(r.problems(), 4, "{r}");
}

#[test]
fn missing_conntrack_is_not_a_problem_but_missing_required_key_is() {
    let p = Profile::Agents10m;
    let dir = good_tree(p);
    let root = dir.path();
    fs::remove_dir_all(root.join("sys/net/netfilter")).unwrap();
    let r = check(&input(root, p)).unwrap();
    assert_eq!(r.problems(), 0, "{r}");
    let f = finding(&r, "net.netfilter.nf_conntrack_max");
    assert_eq!(f.status, Status::Absent);
    assert_eq!(f.live, None);

    // Loaded but too small: a problem.
    write(&root.join("sys/net/netfilter/nf_conntrack_max"), "262144");
    let r = check(&input(root, p)).unwrap();
    assert_eq!(
        finding(&r, "net.netfilter.nf_conntrack_max").status,
        Status::Low
    );

    // Old kernel without tcp_migrate_req: a problem.
    fs::remove_file(root.join("sys/net/ipv4/tcp_migrate_req")).unwrap();
    let r = check(&input(root, p)).unwrap();
    assert_eq!(
        finding(&r, "net.ipv4.tcp_migrate_req").status,
        Status::Missing
    );
    assert_eq!(r.problems(), 2, "{r}");
}

#[test]
fn limits_file_parsing() {
    let path = Path::new("/x/self/limits");
    let l = parse_limits(path, &limits_text("1024", "unlimited")).unwrap();
    assert_eq!(l.nofile_soft, 1024);
    assert_eq!(l.nofile_hard, 1024);
    assert_eq!(l.memlock_soft, u64::MAX);
    // Real kernel layout with differing soft/hard.
    let real = "Limit                     Soft Limit           Hard Limit           Units     \n\
                Max open files            20000                1048576              files     \n\
                Max locked memory         8388608              8388608              bytes     \n";
    let l = parse_limits(path, real).unwrap();
    assert_eq!((l.nofile_soft, l.nofile_hard), (20000, 1_048_576));
    assert_eq!(l.memlock_hard, 8_388_608);

    let err = parse_limits(
        path,
        "Max open files  lots  lots files\nMax locked memory 1 1 bytes\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("/x/self/limits"), "{err}");
    let err = parse_limits(path, "Max open files 1 1 files\n").unwrap_err();
    assert!(err.to_string().contains("Max locked memory"), "{err}");
    assert!(parse_limits(path, "Max open files 1\nMax locked memory 1 1\n").is_err());
}

#[test]
fn low_limits_and_pid_limits() {
    let p = Profile::Agents100k;
    let dir = good_tree(p);
    let root = dir.path();
    write(&root.join("self/limits"), &limits_text("1024", "65536"));
    let r = check(&input(root, p)).unwrap();
    assert!(r.limits.iter().all(|l| l.status == Status::Low), "{r}");
    assert_eq!(r.limits[0].wanted_at_least, 100_000 + NOFILE_RESERVE);
    assert_eq!(r.limits[1].wanted_at_least, 16 * 512 * 1024);
    assert_eq!(r.capacity.by_nofile, 0);
    assert_eq!(r.problems(), 3, "{r}");
    assert!(r.to_string().contains("--pid"));

    write(
        &root.join("4242/limits"),
        &limits_text("16777216", "67108864"),
    );
    let r = check(&CheckInput {
        pid: Some(4242),
        cores: Some(4),
        ..input(root, p)
    })
    .unwrap();
    assert_eq!(r.problems(), 0, "{r}");
    assert_eq!(r.cores, 4);
    assert!(!r.to_string().contains("--pid"));
}

#[test]
fn thousands_grouping() {
    assert_eq!(group(0), "0");
    assert_eq!(group(999), "999");
    assert_eq!(group(1000), "1,000");
    assert_eq!(group(1_234_567), "1,234,567");
    assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
}

#[test]
fn capacity_arithmetic() {
    // 64 GiB, nofile 16M, tcp_mem max 2M pages.
    let c = estimate_capacity(64 << 30, 16_777_216, Some(2_000_000), 4096, 10_000);
    assert_eq!(c.ram_reserve_bytes, (64u64 << 30) / 10);
    assert_eq!(c.by_nofile, 16_777_216 - 1024);
    assert_eq!(c.by_memory, ((64u64 << 30) - (64u64 << 30) / 10) / 14_096);
    assert_eq!(c.by_memory, 4_387_594);
    assert_eq!(c.by_tcp_mem, Some(2_000_000));
    assert_eq!(c.connections(), 2_000_000);
    assert_eq!(c.limited_by(), Bound::TcpMem);

    // Small box: 4 GiB -> 1 GiB reserve (more than 10%).
    let c = estimate_capacity(4 << 30, 16_777_216, None, 4096, 10_000);
    assert_eq!(c.ram_reserve_bytes, 1 << 30);
    assert_eq!(c.by_memory, (3u64 << 30) / 14_096);
    assert_eq!(c.limited_by(), Bound::Memory);

    let c = estimate_capacity(64 << 30, 1024, Some(u64::MAX), 4096, 10_000);
    assert_eq!(c.connections(), 0);
    assert_eq!(c.limited_by(), Bound::OpenFiles);
    // Tiny RAM, zero costs, huge pages: no panic.
    let c = estimate_capacity(1, u64::MAX, Some(u64::MAX), 0, 0);
    assert_eq!(c.by_memory, 0);
}

#[test]
fn host_capacity_warning_cases() {
    let dir = good_tree(Profile::Agents1m);
    let root = dir.path();
    // 256 GiB, nofile 2M, tcp_mem max 2M pages: 1M fits.
    assert_eq!(host_capacity_warning(root, 1_000_000, USER, KERNEL), None);
    let w = host_capacity_warning(root, 5_000_000, USER, KERNEL).unwrap();
    assert!(
        w.contains("open files limit") && w.contains("LimitNOFILE"),
        "{w}"
    );
    fs::remove_file(root.join("meminfo")).unwrap();
    let w = host_capacity_warning(root, 1, USER, KERNEL).unwrap();
    assert!(w.contains("meminfo"), "{w}");
}

#[test]
fn malformed_files_name_the_file() {
    let p = Profile::Agents1m;
    let dir = good_tree(p);
    let root = dir.path();
    write(&root.join("sys/net/core/somaxconn"), "lots");
    let err = check(&input(root, p)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sys/net/core/somaxconn") && msg.contains("net.core.somaxconn"),
        "{msg}"
    );

    let dir = good_tree(p);
    let root = dir.path();
    write(&root.join("meminfo"), "MemTotal: many kB");
    let msg = check(&input(root, p)).unwrap_err().to_string();
    assert!(msg.contains("meminfo"), "{msg}");

    let dir = good_tree(p);
    let root = dir.path();
    write(&root.join("cpuinfo"), "nothing here");
    let msg = check(&input(root, p)).unwrap_err().to_string();
    assert!(msg.contains("cpuinfo"), "{msg}");

    let dir = good_tree(p);
    let root = dir.path();
    fs::remove_file(root.join("self/limits")).unwrap();
    let msg = check(&input(root, p)).unwrap_err().to_string();
    assert!(msg.contains("self/limits"), "{msg}");

    let zero = CheckInput {
        per_conn_user_bytes: 0,
        ..input(root, p)
    };
    assert!(matches!(check(&zero), Err(TuningError::Invalid(_))));
}

#[test]
fn field_count_mismatch_differs() {
    let p = Profile::Agents1m;
    let dir = good_tree(p);
    let root = dir.path();
    write(&root.join("sys/net/ipv4/tcp_mem"), "1000000 2000000");
    // check() still reads tcp_mem for capacity: a two-field tcp_mem is malformed.
    let msg = check(&input(root, p)).unwrap_err().to_string();
    assert!(msg.contains("tcp_mem"), "{msg}");
    write(
        &root.join("sys/net/ipv4/tcp_mem"),
        "1000000 1500000 2000000",
    );
    write(&root.join("sys/net/ipv4/tcp_rmem"), "4096 16384");
    let r = check(&input(root, p)).unwrap();
    assert_eq!(finding(&r, "net.ipv4.tcp_rmem").status, Status::Differs);
}
