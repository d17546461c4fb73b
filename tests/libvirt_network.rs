//! Issue 18, networks: a libvirt VM whose NIC uses a network this host does not have is
//! live-mounted, and the mount's domain XML starts under `virsh start`: with the default
//! `--network disconnect` (the NIC becomes a link-down `type='user'` NIC that names no host
//! network), and with `--network-map OLD=NEW` (the NIC names NEW and starts unplugged).
//!
//! The map's network: the test defines an isolated libvirt network (no forward, no DHCP) and
//! starts the mapped domain on it when libvirt can start that network here. On the machines
//! this was written on it cannot (libvirt applies firewall rules for every network it starts,
//! and there is no iptables), so there the test checks the map in the domain XML and says so
//! on stderr instead of starting that domain.
//!
//! libvirtd and virtlogd are started by `scripts/libvirt-up`; QEMU runs under TCG.

mod common;

use std::path::Path;

use common::*;

/// Stops and undefines the test network however the test ends.
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = virsh(&["net-destroy", &self.0]);
        let _ = virsh(&["net-undefine", &self.0]);
    }
}

/// The mount's domain XML, as a hypervisor reads it over NFS.
fn mounted_xml(server: &Server, mount: &str, vm: &str) -> String {
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{vm}.xml"))],
    );
    assert!(
        def.status.success(),
        "{}",
        String::from_utf8_lossy(&def.stderr)
    );
    String::from_utf8(def.stdout).unwrap()
}

/// Defines and starts the domain `xml`; panics with virsh's error when either fails.
fn define_and_start(dir: &Path, server: &Server, name: &str, xml: &str) -> Domain {
    let path = dir.join(format!("{name}.xml"));
    write(&path, xml.as_bytes());
    let domain = Domain(name.to_owned());
    let out = virsh(&["define", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "virsh define: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = virsh(&["start", name]);
    assert!(
        out.status.success(),
        "virsh start {name}: {}\n{xml}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    domain
}

/// Waits up to two minutes for the guest's boot marker on its console.
fn wait_for_boot(console: &Path) {
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed().as_secs() < 120 {
        log = std::fs::read_to_string(console).unwrap_or_default();
        if log.contains("LIVEMOUNT-GUEST-BOOTED") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the guest did not boot under libvirt:\n{log}");
}

#[test]
fn a_vm_on_a_network_the_host_lacks_starts_disconnected_and_mapped() {
    libvirt_up();

    let pid = std::process::id();
    let missing = format!("lmnosuch{pid}");
    let out = virsh(&["net-info", &missing]);
    assert!(!out.status.success(), "the host has network {missing}");

    let t = tempfile::tempdir().unwrap();
    let image = guest_image();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let console = t.path().join("console.log");
    let vm = format!("lmnet{pid}");
    let xml = format!(
        "<domain type='qemu'>\n  <name>{vm}</name>\n  <uuid>41111111-2222-4333-8444-555555555555</uuid>\n  \
         <memory unit='KiB'>262144</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
         <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <devices>\n    \
         <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
         <source file='guest.img'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    \
         <interface type='network'>\n      <mac address='52:54:00:12:34:57'/>\n      \
         <source network='{missing}'/>\n      <model type='virtio'/>\n    </interface>\n    \
         <serial type='file'><source path='{}'/><target port='0'/></serial>\n  </devices>\n</domain>\n",
        console.display()
    );
    let cfg = t.path().join(format!("{vm}.xml"));
    write(&cfg, xml.as_bytes());
    let repo = repo_with_backup(t.path(), &cfg);

    let _port111 = port_111_lock();
    let server = Server::start(&repo, &t.path().join("state"), "127.0.0.1:111", &[]);

    // The default, --network disconnect: no network named, the link down, and it starts.
    let mount = format!("{vm}-lm1");
    let printed = server.cli(&["mount", &vm]);
    assert!(
        printed.contains("network (disconnect):\n  NIC interface 0 (52:54:00:")
            && printed.contains(&format!(
                "): network {missing} (disconnected, now type='user' with no host network)"
            )),
        "{printed}"
    );
    let def = mounted_xml(&server, &mount, &vm);
    assert!(def.contains("<interface type='user'>"), "{def}");
    assert!(def.contains("<link state='down'/>"), "{def}");
    assert!(!def.contains(&missing), "{def}");
    assert!(!def.contains("52:54:00:12:34:57"), "a new MAC: {def}");
    {
        let _domain = define_and_start(t.path(), &server, &mount, &def);
        wait_for_boot(&console);
    }

    // --network-map OLD=NEW: the NIC names NEW, still unplugged.
    let new = format!("lmnew{pid}");
    let mapped = format!("{vm}-map");
    let printed = server.cli(&[
        "mount",
        &vm,
        "--name",
        &mapped,
        "--network-map",
        &format!("{missing}={new}"),
    ]);
    assert!(
        printed.contains(&format!("): network {missing} -> {new} (disconnected)")),
        "{printed}"
    );
    let def = mounted_xml(&server, &mapped, &vm);
    assert!(def.contains("<interface type='network'>"), "{def}");
    assert!(def.contains(&format!("<source network='{new}'/>")), "{def}");
    assert!(def.contains("<link state='down'/>"), "{def}");
    assert!(!def.contains(&missing), "{def}");
    let net_xml = t.path().join("net.xml");
    write(
        &net_xml,
        format!("<network><name>{new}</name><bridge name='lmbr{pid}' stp='off'/></network>")
            .as_bytes(),
    );
    let _network = Network(new.clone());
    let defined = virsh(&["net-define", net_xml.to_str().unwrap()]);
    assert!(
        defined.status.success(),
        "virsh net-define: {}",
        String::from_utf8_lossy(&defined.stderr)
    );
    let started = virsh(&["net-start", &new]);
    if started.status.success() {
        let _ = std::fs::remove_file(&console);
        let _domain = define_and_start(t.path(), &server, &mapped, &def);
        wait_for_boot(&console);
    } else {
        eprintln!(
            "libvirt cannot start network {new} here, so the mapped domain was checked in its \
             XML only: {}",
            String::from_utf8_lossy(&started.stderr).trim()
        );
    }

    // A map entry no NIC uses is refused, naming it; --network remove leaves no NIC.
    let out = livemount(&[
        "mount",
        &vm,
        "--name",
        "typo",
        "--network-map",
        "defualt=lab",
        "--state",
        t.path().join("state").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no NIC uses \"defualt\""),
        "{stderr}"
    );
    let out = livemount(&[
        "mount",
        &vm,
        "--network-map",
        "nonsense",
        "--state",
        t.path().join("state").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--network-map") && stderr.contains("OLD=NEW"),
        "{stderr}"
    );
    let removed = format!("{vm}-none");
    let printed = server.cli(&["mount", &vm, "--name", &removed, "--network", "remove"]);
    assert!(
        printed.contains(&format!("NIC interface 0: network {missing} (removed)")),
        "{printed}"
    );
    let def = mounted_xml(&server, &removed, &vm);
    assert!(!def.contains("<interface"), "{def}");

    // Restarted with a default `network_map` in serve's config: the mounts made before keep
    // their config (the spec records the map a mount was made with), a new mount without a
    // map of its own takes the default, and a default entry no NIC uses is no error.
    let state = t.path().join("state");
    let earlier = mounted_xml(&server, &mount, &vm);
    server.stop();
    let config = t.path().join("serve.toml");
    let default = format!("lmdef{pid}");
    write(
        &config,
        format!("[network_map]\n{missing} = \"{default}\"\nunused = \"x\"\n").as_bytes(),
    );
    let server = Server::start(
        &repo,
        &state,
        "127.0.0.1:111",
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(mounted_xml(&server, &mount, &vm), earlier);
    let defaulted = format!("{vm}-def");
    let printed = server.cli(&["mount", &vm, "--name", &defaulted]);
    assert!(
        printed.contains(&format!("): network {missing} -> {default} (disconnected)")),
        "{printed}"
    );
    let def = mounted_xml(&server, &defaulted, &vm);
    assert!(
        def.contains(&format!("<source network='{default}'/>")),
        "{def}"
    );
    // The request's own map wins over the default.
    let own = format!("{vm}-own");
    server.cli(&[
        "mount",
        &vm,
        "--name",
        &own,
        "--network-map",
        &format!("{missing}={new}"),
    ]);
    let def = mounted_xml(&server, &own, &vm);
    assert!(def.contains(&format!("<source network='{new}'/>")), "{def}");
}
