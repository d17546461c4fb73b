//! Recovery on the other hypervisor (`mount --for kvm|esxi`), with clients nobody here wrote:
//! an ESXi backup of the test guest, converted to libvirt domain XML, is defined and started by
//! libvirt and boots (TCG); a KVM backup converted to a `.vmx` is read by qemu-img over
//! `nfs://` and through its VMDK descriptors, byte for byte, and survives a restart unchanged.

mod common;

use common::*;

#[test]
fn an_esxi_backup_mounted_for_kvm_is_defined_started_and_boots_under_libvirt() {
    libvirt_up();
    let t = tempfile::tempdir().unwrap();
    // The test guest as an ESXi VM: a monolithicFlat VMDK on pvscsi, a vmxnet3 NIC on a port
    // group this host has no network for.
    convert(
        &guest_image(),
        &t.path().join("lab.vmdk"),
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
    );
    let vm = format!("lmesx{}", std::process::id());
    let vmx = esxi_config(t.path(), &vm, &["lab.vmdk"]);
    let mut text = std::fs::read_to_string(&vmx).unwrap();
    text.push_str(
        "ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\n\
         ethernet0.networkName = \"VM Network\"\nethernet0.addressType = \"generated\"\n\
         ethernet0.generatedAddress = \"00:0c:29:aa:bb:cc\"\n",
    );
    write(&vmx, text.as_bytes());
    let repo = repo_with_backup(t.path(), &vmx);

    let _port111 = port_111_lock();
    let server = Server::start(&repo, &t.path().join("state"), "127.0.0.1:111", &[]);
    let mount = format!("{vm}-lm1");
    // The guest's initramfs has virtio drivers only: the disk goes on virtio-blk.
    let out = server.cli(&["mount", &vm, "--for", "kvm", "--disk-bus", "virtio"]);
    for wanted in [
        "converted from esxi for kvm",
        "scsi0:0 (pvscsi disk) -> vda (virtio-blk)",
        "ethernet0 (vmxnet3 NIC) -> e1000e NIC on network VM Network",
        "firmware (BIOS) -> SeaBIOS on a q35 machine",
        &format!("virsh define {mount}.xml"),
    ] {
        assert!(out.contains(wanted), "{wanted:?} missing in:\n{out}");
    }
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{vm}.xml"))],
    );
    assert!(def.status.success(), "{}", output_text(&def));
    let xml = String::from_utf8(def.stdout).unwrap();
    for wanted in [
        format!("<name>{mount}</name>"),
        format!("protocol='nfs' name='/livemount/{mount}/lab.raw'"),
        "<interface type='user'>".to_owned(),
        "<link state='down'/>".to_owned(),
    ] {
        assert!(xml.contains(&wanted), "{wanted} missing in:\n{xml}");
    }
    assert!(!xml.contains("00:0c:29:aa:bb:cc"), "a new MAC: {xml}");

    // This machine runs guests under TCG, and the test reads the guest's serial console from
    // a file: the two changes made to the XML the mount serves for a KVM host.
    let console = t.path().join("console.log");
    let xml = xml
        .replace("<domain type='kvm'>", "<domain type='qemu'>")
        .replace(
            "<cpu mode='host-model'>",
            "<cpu mode='custom' match='exact'><model>qemu64</model>",
        )
        .replace(
            "<serial type='pty'>\n      <target port='0'/>\n    </serial>\n    \
             <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>",
            &format!(
                "<serial type='file'><source path='{}'/><target port='0'/></serial>",
                console.display()
            ),
        );
    assert!(xml.contains("<serial type='file'>"), "{xml}");
    let def_path = t.path().join("def.xml");
    write(&def_path, xml.as_bytes());
    let _domain = Domain(mount.clone());
    let out = virsh(&["define", def_path.to_str().unwrap()]);
    assert!(out.status.success(), "virsh define: {}", output_text(&out));
    let out = virsh(&["start", &mount]);
    assert!(
        out.status.success(),
        "virsh start: {}\n{}",
        output_text(&out),
        server.log_text()
    );
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed().as_secs() < 120 {
        log = std::fs::read_to_string(&console).unwrap_or_default();
        if log.contains("LIVEMOUNT-GUEST-DONE") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        log.contains("LIVEMOUNT-GUEST-BOOTED") && log.contains("LIVEMOUNT-GUEST-DONE"),
        "the converted VM did not boot under libvirt:\n{log}"
    );
    eprintln!(
        "esxi backup for kvm: guest done {:.2} s after virsh start returned",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_kvm_backup_mounted_for_esxi_serves_a_vmx_and_descriptors_that_read_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let a = mixed_disk(6 * MIB, 41);
    let b = mixed_disk(3 * MIB, 42);
    write(&t.path().join("a.img"), &a);
    write(&t.path().join("b.img"), &b);
    let cfg = kvm_config(t.path(), "kvm02", &[("a.img", "raw"), ("b.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let _port111 = port_111_lock();
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "127.0.0.1:111", &[]);

    // What the target lacks is refused, and nothing is mounted.
    for (args, wanted) in [
        (
            vec!["--for", "esxi", "--disk-bus", "virtio"],
            "ESXi has no virtio disks; use scsi (pvscsi) or sata",
        ),
        (
            vec!["--nic-model", "e1000"],
            "apply to a config converted with --for esxi",
        ),
    ] {
        let mut all = vec!["mount", "kvm02", "--state", state.to_str().unwrap()];
        all.extend(args);
        let out = livemount(&all);
        assert!(!out.status.success());
        let text = output_text(&out);
        assert!(
            text.contains(wanted) && text.contains("nothing was mounted"),
            "{text}"
        );
    }
    assert!(
        !server.cli(&["mounts"]).contains("kvm02"),
        "a refused mount is not listed"
    );

    let reply: serde_json::Value = serde_json::from_str(&server.cli(&[
        "mount",
        "kvm02",
        "--for",
        "esxi",
        "--disk-bus",
        "scsi",
        "--json",
    ]))
    .unwrap();
    let m = &reply["mount"];
    let mount = m["spec"]["name"].as_str().unwrap().to_owned();
    assert_eq!(m["hypervisor"], "esxi");
    assert_eq!(m["converted_from"], "kvm");
    assert_eq!(m["config"], "kvm02.vmx");
    let devices = m["devices"].to_string();
    assert!(
        devices.contains("scsi0:0 on a pvscsi SCSI controller"),
        "{devices}"
    );
    assert!(
        reply["attach"]["esxi"][1]
            .as_str()
            .unwrap()
            .contains(&format!(
                "registervm /vmfs/volumes/livemount/{mount}/kvm02.vmx"
            )),
        "{reply}"
    );
    let url = |file: &str| format!("nfs://127.0.0.1/livemount/{mount}/{file}");
    let vmx_bytes = {
        let out = client(
            "nfs-cat",
            &[&server.libnfs_url(&format!("{mount}/kvm02.vmx"))],
        );
        assert!(out.status.success(), "{}", output_text(&out));
        out.stdout
    };
    let vmx = livemount::vmconfig::parse("kvm02.vmx", &vmx_bytes).unwrap();
    assert_eq!(vmx.hypervisor, livemount::vmconfig::Hypervisor::Esxi);
    assert_eq!(vmx.name, mount);
    let paths: Vec<&str> = vmx.disks.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, ["a.vmdk", "b.vmdk"]);
    let text = String::from_utf8_lossy(&vmx_bytes);
    assert!(text.contains("scsi0.virtualDev = \"pvscsi\""), "{text}");
    assert!(!text.contains("ethernet0"), "the VM had no NIC: {text}");

    // QEMU cannot follow a descriptor's relative extent over nfs:// (decision 0004: its NFS
    // driver gives a file's own path as its folder). So each flat file is compared over
    // nfs://, and each descriptor and its flat file, exactly as served, are fetched into one
    // folder where qemu-img opens the descriptor.
    let local = t.path().join("served");
    std::fs::create_dir(&local).unwrap();
    for (desc, flat, source, size) in [
        ("a.vmdk", "a-flat.vmdk", "a.img", 6 * MIB),
        ("b.vmdk", "b-flat.vmdk", "b.img", 3 * MIB),
    ] {
        let source = t.path().join(source);
        let source = source.to_str().unwrap();
        let out = client(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &url(flat), source],
        );
        assert!(out.status.success(), "{flat}: {}", output_text(&out));
        for name in [desc, flat] {
            let out = client("nfs-cat", &[&server.libnfs_url(&format!("{mount}/{name}"))]);
            assert!(out.status.success(), "{name}: {}", output_text(&out));
            write(&local.join(name), &out.stdout);
        }
        let text = std::fs::read_to_string(local.join(desc)).unwrap();
        assert!(
            text.contains(&format!("RW {} VMFS \"{flat}\"", size / 512))
                && text.contains("ddb.adapterType = \"lsilogic\""),
            "{text}"
        );
        let desc = local.join(desc);
        let desc = desc.to_str().unwrap();
        let info = client("qemu-img", &["info", "--output=json", desc]);
        assert!(info.status.success(), "{}", output_text(&info));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(info["virtual-size"], size, "{info}");
        let out = client(
            "qemu-img",
            &["compare", "-f", "vmdk", "-F", "raw", desc, source],
        );
        assert!(out.status.success(), "{desc}: {}", output_text(&out));
    }

    // A restart serves the same converted config and files.
    let before = server.cli(&["mounts", "--json"]);
    drop(server);
    let server = Server::start(&repo, &state, "127.0.0.1:111", &[]);
    let out = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/kvm02.vmx"))],
    );
    assert_eq!(out.stdout, vmx_bytes, "the same .vmx after a restart");
    let after = server.cli(&["mounts", "--json"]);
    let (before, after): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    assert_eq!(after[0]["converted_from"], "kvm", "{after}");
    assert_eq!(after[0]["devices"], before[0]["devices"], "{after}");
    assert_eq!(after[0]["files"], before[0]["files"], "{after}");
    let out = client(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &url("a-flat.vmdk"),
            t.path().join("a.img").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "after restart: {}", output_text(&out));
}
