//! Table tests of the conversion on the configs in testdata/ (and two written here): what each
//! device becomes, what is reported as left behind, and that the result reads back with the
//! project's own parser as a config of the target with the same disks.

use super::*;
use crate::vmconfig::parse;

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn run(name: &str, bytes: &[u8], to: Hypervisor, disk_bus: DiskBus) -> (String, Converted) {
    let config = parse(name, bytes).unwrap();
    let files: Vec<String> = (0..config.disks.len())
        .map(|i| match to {
            Hypervisor::Esxi => format!("disk{i}.vmdk"),
            Hypervisor::Kvm => format!("/mnt/disk{i}.raw"),
        })
        .collect();
    let how = Conversion {
        to,
        disk_bus,
        nic_model: NicModel::Auto,
    };
    let out = convert(name, bytes, &config, &how, &files).unwrap();
    let text = String::from_utf8(out.bytes.clone()).unwrap();
    let back = parse("out", &out.bytes).unwrap();
    assert_eq!(back.hypervisor, to);
    assert_eq!(back.name, config.name);
    assert_eq!(
        back.uuid, config.uuid,
        "the identity is the rewrite's business"
    );
    assert_eq!(back.disks.len(), config.disks.len());
    for (j, disk) in back.disks.iter().enumerate() {
        assert_eq!(disk.path, files[out.order[j]]);
    }
    (text, out)
}

/// The report as lines, dropped ones prefixed `-`.
fn lines(out: &Converted) -> Vec<String> {
    out.devices
        .iter()
        .map(|d| {
            if d.is_dropped() {
                format!("- {d}")
            } else {
                d.to_string()
            }
        })
        .collect()
}

fn has(lines: &[String], wanted: &str) {
    assert!(
        lines.iter().any(|l| l.contains(wanted)),
        "no line with {wanted:?} in:\n{}",
        lines.join("\n")
    );
}

#[test]
fn an_efi_windows_server_with_secure_boot_and_vtpm_becomes_q35_ovmf_with_each_loss_listed() {
    let vmx = testdata("esxi8-ws2025-dc01.vmx");
    let (xml, out) = run("dc01.vmx", &vmx, Hypervisor::Kvm, DiskBus::Auto);
    for wanted in [
        "<os firmware='efi'>",
        "<type arch='x86_64' machine='q35'>hvm</type>",
        "<feature enabled='yes' name='secure-boot'/>",
        "<smm state='on'/>",
        "<memory unit='MiB'>8192</memory>",
        "<vcpu placement='static'>4</vcpu>",
        "<topology sockets='1' dies='1' cores='4' threads='1'/>",
        "<clock offset='localtime'/>",
        "<relaxed state='on'/>",
        "<controller type='scsi' index='0' model='vmpvscsi'/>",
        "<target dev='sda' bus='scsi'/>",
        "<target dev='sdb' bus='sata'/>",
        "<source network='Servers-VLAN20'/>",
        "<model type='e1000e'/>",
        "<uuid>423b6e01-9d27-4c58-a1f0-337e82c519d4</uuid>",
    ] {
        assert!(xml.contains(wanted), "{wanted} missing in:\n{xml}");
    }
    assert!(!xml.contains("vmxnet3"), "{xml}");
    assert_eq!(out.slots, ["sda", "sdb"]);
    let report = lines(&out);
    has(
        &report,
        "scsi0:0 (pvscsi disk) -> sda on a vmpvscsi SCSI controller",
    );
    has(
        &report,
        "nvme0:0 (nvme disk) -> sdb on SATA: this libvirt has no NVMe",
    );
    has(
        &report,
        "ethernet0 (vmxnet3 NIC) -> e1000e NIC on network Servers-VLAN20",
    );
    has(
        &report,
        "firmware (EFI, secure boot) -> OVMF with secure boot",
    );
    for dropped in [
        "- vtpm (virtual TPM): not carried over",
        "- encryption (VM encryption",
        "- pciPassthru0 (PCI passthrough device)",
        "- sata0:0 (CD-ROM /vmfs/volumes/datastore1/ISO/",
        "- usb_xhci (USB controller)",
        "- nvram (EFI variables)",
        "- sched (resource settings",
    ] {
        has(&report, dropped);
    }
}

#[test]
fn an_efi_linux_vm_keeps_its_controllers_and_boots_from_any_disk_in_order() {
    let vmx = testdata("esxi8-rocky9-web01.vmx");
    let (xml, out) = run("web01.vmx", &vmx, Hypervisor::Kvm, DiskBus::Auto);
    assert!(
        xml.contains("<feature enabled='no' name='secure-boot'/>"),
        "{xml}"
    );
    assert!(!xml.contains("<smm"), "{xml}");
    assert!(xml.contains("<clock offset='utc'/>"), "{xml}");
    // scsi0:2 and scsi0:10 (pvscsi), sata0:1, nvme0:0; scsi0:3 and scsi1 are not present.
    assert_eq!(out.slots, ["sda", "sdb", "sdc", "sdd"]);
    assert!(
        xml.contains("<address type='drive' controller='0' bus='0' target='1' unit='0'/>"),
        "{xml}"
    );
    for order in 1..=4 {
        assert!(xml.contains(&format!("<boot order='{order}'/>")), "{xml}");
    }
    let report = lines(&out);
    has(&report, "sata0:1 (sata disk) -> sdc on SATA");
    has(&report, "- ide1:0 (CD-ROM CD/DVD drive 0)");

    let (xml, out) = run("web01.vmx", &vmx, Hypervisor::Kvm, DiskBus::Virtio);
    assert_eq!(out.slots, ["vda", "vdb", "vdc", "vdd"]);
    assert!(!xml.contains("<controller"), "{xml}");
}

#[test]
fn a_kvm_vm_with_a_bridge_nic_and_a_sata_cdrom_becomes_a_vmx_on_sata() {
    let xml = testdata("kvm-debian12-web02-bridge.xml");
    let (vmx, out) = run("web02.xml", &xml, Hypervisor::Esxi, DiskBus::Auto);
    for wanted in [
        "displayName = \"debian12-web02\"",
        "virtualHW.version = \"19\"",
        "memSize = \"2048\"",
        "numvcpus = \"2\"",
        "firmware = \"bios\"",
        "guestOS = \"other5xlinux-64\"",
        "sata0.present = \"TRUE\"",
        "sata0:0.fileName = \"disk0.vmdk\"",
        "bios.hddOrder = \"sata0:0\"",
        "ethernet0.networkName = \"br-prod\"",
        "ethernet0.virtualDev = \"e1000e\"",
        "ethernet1.networkName = \"backup-net\"",
        "ethernet1.startConnected = \"TRUE\"",
        "uuid.bios = \"7d 2e 4b 90 1c 6a 4f 35-b8 e2 5a 0c 9d 3f 6e 17\"",
    ] {
        assert!(vmx.contains(wanted), "{wanted} missing in:\n{vmx}");
    }
    assert_eq!(out.slots, ["sata0:0"]);
    let report = lines(&out);
    has(
        &report,
        "vda (virtio disk) -> sata0:0 on SATA: ESXi has no virtio",
    );
    has(
        &report,
        "- sda (CD-ROM /var/lib/libvirt/boot/debian-12.5.0-amd64-netinst.iso)",
    );
    has(
        &report,
        "interface 0 (virtio NIC) -> ethernet0, e1000e on port group br-prod",
    );
    has(
        &report,
        "guest OS (not stated) -> guestOS = other5xlinux-64",
    );

    let (vmx, out) = run("web02.xml", &xml, Hypervisor::Esxi, DiskBus::Scsi);
    assert!(vmx.contains("scsi0.virtualDev = \"pvscsi\""), "{vmx}");
    assert!(
        vmx.contains("scsi0:0.deviceType = \"scsi-hardDisk\""),
        "{vmx}"
    );
    assert_eq!(out.slots, ["scsi0:0"]);
}

#[test]
fn a_running_ubuntu_domain_lists_its_guest_agent_rng_and_cdrom_as_left_behind() {
    let xml = testdata("kvm-ubuntu2204-db01.xml");
    let (vmx, out) = run("db01.xml", &xml, Hypervisor::Esxi, DiskBus::Auto);
    assert!(vmx.contains("guestOS = \"ubuntu-64\""), "{vmx}");
    assert!(vmx.contains("cpuid.coresPerSocket = \"4\""), "{vmx}");
    assert!(vmx.contains("memSize = \"8192\""), "{vmx}");
    assert_eq!(out.slots, ["sata0:0", "sata0:1"]);
    let report = lines(&out);
    has(&report, "- channel (org.qemu.guest_agent.0)");
    has(&report, "- rng (<rng>)");
    has(&report, "- sda (CD-ROM");
    // Devices ESXi replaces with its own are not reported as lost.
    assert!(
        !report
            .iter()
            .any(|l| l.contains("graphics") || l.contains("memballoon")),
        "{report:?}"
    );
}

/// A KVM VM with EFI and secure boot, a passthrough GPU, a vTPM, a passthrough NIC and four
/// disks on four buses (virtio, an LSI SAS and an LSI Logic SCSI controller, IDE).
const KVM_EFI: &str = "<domain type='kvm'>
  <name>win-app03</name>
  <uuid>0b7e2f14-8a3c-4d1e-9f25-6c4a1b3d2e07</uuid>
  <memory unit='GiB'>16</memory>
  <vcpu>8</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader secure='yes'/>
  </os>
  <features><acpi/><apic/><hyperv mode='custom'><relaxed state='on'/></hyperv><smm state='on'/></features>
  <cpu mode='host-passthrough'><topology sockets='2' dies='1' cores='4' threads='1'/></cpu>
  <clock offset='localtime'/>
  <cputune><vcpupin vcpu='0' cpuset='2'/></cputune>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/app03-data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/app03-os.qcow2'/>
      <target dev='sda' bus='scsi'/>
      <address type='drive' controller='1' bus='0' target='0' unit='0'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/app03-legacy.raw'/>
      <target dev='hda' bus='ide'/>
      <shareable/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/app03-logs.raw'/>
      <target dev='sdb' bus='scsi'/>
      <address type='drive' controller='2' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='scsi' index='1' model='lsisas1068'/>
    <controller type='scsi' index='2' model='lsilogic'/>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <serial type='pty'><target port='0'/></serial>
    <interface type='hostdev' managed='yes'>
      <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/></source>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <link state='down'/>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x65' slot='0x00' function='0x0'/></source>
    </hostdev>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
";

#[test]
fn a_kvm_vm_with_efi_secure_boot_passthrough_and_tpm_becomes_a_vmx_with_each_loss_listed() {
    let (vmx, out) = run(
        "app03.xml",
        KVM_EFI.as_bytes(),
        Hypervisor::Esxi,
        DiskBus::Auto,
    );
    for wanted in [
        "firmware = \"efi\"",
        "uefi.secureBoot.enabled = \"TRUE\"",
        "memSize = \"16384\"",
        "numvcpus = \"8\"",
        "cpuid.coresPerSocket = \"4\"",
        "guestOS = \"windows2019srvNext-64\"",
        "scsi0.virtualDev = \"lsisas1068\"",
        "scsi0:0.fileName = \"disk1.vmdk\"",
        "sata0:0.fileName = \"disk0.vmdk\"",
        "sata0:1.fileName = \"disk3.vmdk\"",
        "ide0:0.fileName = \"disk2.vmdk\"",
        "ide0:0.deviceType = \"ata-hardDisk\"",
        "ethernet0.networkName = \"default\"",
        "ethernet0.startConnected = \"FALSE\"",
    ] {
        assert!(vmx.contains(wanted), "{wanted} missing in:\n{vmx}");
    }
    assert!(
        !vmx.contains("ethernet1"),
        "the passthrough NIC is gone: {vmx}"
    );
    assert!(
        !vmx.contains("bios.hddOrder"),
        "EFI has no BIOS disk order: {vmx}"
    );
    // The converted .vmx lists SCSI, then SATA, then IDE: the order maps back to the source.
    assert_eq!(out.order, [1, 0, 3, 2]);
    assert_eq!(out.slots, ["sata0:0", "scsi0:0", "ide0:0", "sata0:1"]);
    let report = lines(&out);
    has(
        &report,
        "sda (lsisas1068 disk) -> scsi0:0 on a lsisas1068 SCSI controller",
    );
    has(
        &report,
        "sdb (lsilogic disk) -> sata0:1 on SATA: QEMU's lsilogic is a 53C895A",
    );
    has(&report, "hda (ide disk) -> ide0:0 on IDE");
    for dropped in [
        "- hda (shared with other VMs (<shareable/>))",
        "- serial (serial port (pty))",
        "- usb (USB controller)",
        "- interface 0 (type='hostdev' NIC)",
        "- hostdev (pci passthrough device)",
        "- tpm (virtual TPM)",
        "- cputune (<cputune>)",
        "- nvram (EFI variables)",
    ] {
        has(&report, dropped);
    }

    // And back: the .vmx made for ESXi converts to KVM with the same firmware and buses.
    let config = parse("app03.vmx", vmx.as_bytes()).unwrap();
    let files: Vec<String> = (0..4).map(|i| format!("/d{i}")).collect();
    let back = convert(
        "app03.vmx",
        vmx.as_bytes(),
        &config,
        &Conversion {
            to: Hypervisor::Kvm,
            disk_bus: DiskBus::Auto,
            nic_model: NicModel::Virtio,
        },
        &files,
    )
    .unwrap();
    let xml = String::from_utf8(back.bytes).unwrap();
    assert!(
        xml.contains("<feature enabled='yes' name='secure-boot'/>"),
        "{xml}"
    );
    assert!(
        xml.contains("<controller type='scsi' index='0' model='lsisas1068'/>"),
        "{xml}"
    );
    assert!(xml.contains("<model type='virtio'/>"), "{xml}");
    assert!(xml.contains("<link state='down'/>"), "{xml}");
    assert!(
        xml.contains("<topology sockets='2' dies='1' cores='4'"),
        "{xml}"
    );
}

#[test]
fn options_the_target_lacks_are_refused_with_what_to_use() {
    let cases = [
        (
            Hypervisor::Esxi,
            DiskBus::Virtio,
            NicModel::Auto,
            "use scsi (pvscsi) or sata",
        ),
        (
            Hypervisor::Esxi,
            DiskBus::Auto,
            NicModel::Virtio,
            "use e1000e or vmxnet3",
        ),
        (
            Hypervisor::Kvm,
            DiskBus::Ide,
            NicModel::Auto,
            "no IDE controller; use sata",
        ),
    ];
    for (to, disk_bus, nic_model, wanted) in cases {
        let c = Conversion {
            to,
            disk_bus,
            nic_model,
        };
        let err = c.check().unwrap_err();
        assert!(err.contains(wanted), "{err}");
    }
    let xml = testdata("kvm-debian12-web02-bridge.xml");
    let config = parse("web02.xml", &xml).unwrap();
    let err = convert(
        "web02.xml",
        &xml,
        &config,
        &Conversion {
            to: Hypervisor::Kvm,
            disk_bus: DiskBus::Auto,
            nic_model: NicModel::Auto,
        },
        &["/x".to_owned()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("already for kvm"), "{err}");
}

#[test]
fn more_ide_disks_than_esxi_has_slots_is_an_error_naming_the_disk() {
    let mut disks = String::new();
    for i in 0..5 {
        disks.push_str(&format!(
            "<disk type='file' device='disk'><source file='/d{i}'/>\
             <target dev='hd{}' bus='ide'/></disk>",
            drive_letters(i)
        ));
    }
    let xml = format!("<domain><name>old</name><devices>{disks}</devices></domain>");
    let config = parse("old.xml", xml.as_bytes()).unwrap();
    let files: Vec<String> = (0..5).map(|i| format!("d{i}.vmdk")).collect();
    let err = convert(
        "old.xml",
        xml.as_bytes(),
        &config,
        &Conversion {
            to: Hypervisor::Esxi,
            disk_bus: DiskBus::Ide,
            nic_model: NicModel::Auto,
        },
        &files,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("disk hde") && err.contains("--disk-bus"),
        "{err}"
    );
}

#[test]
fn drive_letters_run_past_z() {
    assert_eq!(drive_letters(0), "a");
    assert_eq!(drive_letters(25), "z");
    assert_eq!(drive_letters(26), "aa");
    assert_eq!(drive_letters(27), "ab");
    assert_eq!(drive_letters(701), "zz");
    assert_eq!(drive_letters(702), "aaa");
}

#[test]
fn the_mount_rewrite_gives_a_converted_config_its_identity_disks_and_network_plan() {
    use crate::vmconfig::{
        rewrite_for_mount_reported, DiskTarget, MountRewrite, NetworkMode, NetworkPlan,
    };
    let vmx = testdata("esxi8-rocky9-web01.vmx");
    let how = MountRewrite {
        display_name: "web01-lm1".to_owned(),
        uuid: "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05".to_owned(),
        mac_seed: [7; 32],
        network: NetworkPlan {
            mode: NetworkMode::Disconnect,
            ..NetworkPlan::default()
        },
        disks: (0..4)
            .map(|i| DiskTarget::Nfs {
                host: "10.0.0.5".to_owned(),
                path: format!("/livemount/web01-lm1/d{i}.raw"),
            })
            .collect(),
        convert: Some(Conversion {
            to: Hypervisor::Kvm,
            disk_bus: DiskBus::Auto,
            nic_model: NicModel::Auto,
        }),
    };
    let done = rewrite_for_mount_reported("web01.vmx", &vmx, &how).unwrap();
    let xml = String::from_utf8(done.bytes.clone()).unwrap();
    assert_eq!(done.hypervisor, Hypervisor::Kvm);
    assert!(xml.contains("<name>web01-lm1</name>"), "{xml}");
    assert!(
        xml.contains("<uuid>3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05</uuid>"),
        "{xml}"
    );
    for i in 0..4 {
        assert!(
            xml.contains(&format!(
                "<source protocol='nfs' name='/livemount/web01-lm1/d{i}.raw'>"
            )),
            "disk {i}: {xml}"
        );
    }
    // The port group is not a network of this host: the NIC is detached, link down.
    assert!(xml.contains("<interface type='user'>"), "{xml}");
    assert!(xml.contains("<link state='down'/>"), "{xml}");
    assert!(!xml.contains("00:0c:29:5e:a1:47"), "a new MAC: {xml}");
    assert_eq!(done.nics.len(), 1);
    assert_eq!(done.disk_slots, ["sda", "sdb", "sdc", "sdd"]);
    assert!(done.devices.iter().any(|d| d.device == "nvram"));

    // A map names the port group as the converted config has it: a libvirt network.
    let mut mapped = how.clone();
    mapped.network.map = [("DMZ-VLAN120".to_owned(), "lab".to_owned())].into();
    let done = rewrite_for_mount_reported("web01.vmx", &vmx, &mapped).unwrap();
    let xml = String::from_utf8(done.bytes).unwrap();
    assert!(xml.contains("<source network='lab'/>"), "{xml}");
}

#[test]
fn an_lsi_logic_disk_goes_to_sata_on_kvm_and_pvscsi_disks_get_a_target_each() {
    let vmx = "displayName = \"old\"\nmemSize = \"2048\"\nscsi0.present = \"TRUE\"\n\
               scsi0.virtualDev = \"lsilogic\"\nscsi0:0.present = \"TRUE\"\n\
               scsi0:0.fileName = \"old.vmdk\"\nscsi1.present = \"TRUE\"\n\
               scsi1.virtualDev = \"pvscsi\"\nscsi1:0.present = \"TRUE\"\n\
               scsi1:0.fileName = \"a.vmdk\"\nscsi1:1.present = \"TRUE\"\n\
               scsi1:1.fileName = \"b.vmdk\"\nvhv.enable = \"TRUE\"\n";
    let (xml, out) = run("old.vmx", vmx.as_bytes(), Hypervisor::Kvm, DiskBus::Auto);
    assert_eq!(out.slots, ["sda", "sdb", "sdc"]);
    assert!(xml.contains("<target dev='sda' bus='sata'/>"), "{xml}");
    assert!(
        xml.contains("<controller type='scsi' index='0' model='vmpvscsi'/>"),
        "{xml}"
    );
    for target in 0..2 {
        assert!(
            xml.contains(&format!(
                "<address type='drive' controller='0' bus='0' target='{target}' unit='0'/>"
            )),
            "{xml}"
        );
    }
    let report = lines(&out);
    has(
        &report,
        "scsi0:0 (lsilogic disk) -> sda on SATA: QEMU has no LSI 53C1030",
    );
    has(&report, "- vhv.enable (nested virtualization");
}

#[test]
fn memory_is_rounded_to_what_esxi_takes_and_nics_past_ten_are_listed() {
    let mut nics = String::new();
    for i in 0..11 {
        nics.push_str(&format!(
            "<interface type='network'><source network='n{i}'/></interface>"
        ));
    }
    let xml = format!(
        "<domain><name>big</name><memory unit='KiB'>1049600</memory><devices>\
         <disk type='file' device='disk'><source file='/d0'/><target dev='vda' bus='virtio'/>\
         </disk>{nics}</devices></domain>"
    );
    let (vmx, out) = run("big.xml", xml.as_bytes(), Hypervisor::Esxi, DiskBus::Auto);
    assert!(vmx.contains("memSize = \"1024\""), "{vmx}");
    assert!(vmx.contains("ethernet9.networkName = \"n9\""), "{vmx}");
    assert!(!vmx.contains("ethernet10"), "{vmx}");
    let report = lines(&out);
    has(&report, "memory (1025 MiB) -> memSize = 1024");
    has(
        &report,
        "- interface 10 (rtl8139 NIC): not carried over: ESXi takes 10 NICs",
    );
}
